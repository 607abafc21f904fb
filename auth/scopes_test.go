package auth

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/go-jose/go-jose/v4"

	"github.com/kiln-fhir/kiln"
)

func TestParseScopes(t *testing.T) {
	cases := []struct {
		scope                  string
		read, write, notRead   []string
		patient, accessAll     bool
		access, accessWrite    []string
		hasAccess, canTagEmpty bool
	}{
		{scope: "system/*.read access/*.read", read: []string{"Patient", "Observation"}, notRead: nil, accessAll: true, hasAccess: true},
		{scope: "user/Observation.read access/a.read", read: []string{"Observation"}, notRead: []string{"Patient"}, access: []string{"a"}, hasAccess: true},
		{scope: "system/Observation.rs system/Patient.cruds access/a.* access/b.write", read: []string{"Observation", "Patient"}, write: []string{"Patient"}, notRead: []string{"Encounter"}, access: []string{"a"}, accessWrite: []string{"a", "b"}, hasAccess: true},
		{scope: "system/Observation.s", notRead: []string{"Observation"}}, // search only: see TestReadAndSearchApart
		{scope: "system/Observation.c", write: []string{"Observation"}, notRead: []string{"Observation"}},
		{scope: "patient/*.read", notRead: []string{"Patient"}, patient: true}, // no patient context: nothing
		{scope: "system/Observation.rs?category=laboratory openid launch", read: []string{"Observation"}, notRead: []string{"Patient"}},
		{scope: "system/Observation.cud?category=laboratory", notRead: []string{"Observation"}}, // filtered writes grant nothing
		{scope: "system/*.rs?_security=x", notRead: []string{"Observation"}},                    // nor filters on *
		{scope: "system/Observation.rs?no-such-param=1", notRead: []string{"Observation"}},      // nor filters Kiln cannot evaluate
		{scope: "system/Observation.rs?category=laboratory&category=vital-signs", read: []string{"Observation"}},
		{scope: "system/Observation.xyz", notRead: []string{"Observation"}},
	}
	for _, c := range cases {
		p := ParseScopes("u", c.scope)
		for _, typ := range c.read {
			if !p.CanRead(typ) {
				t.Errorf("%q: cannot read %s", c.scope, typ)
			}
		}
		for _, typ := range c.notRead {
			if p.CanRead(typ) {
				t.Errorf("%q: can read %s", c.scope, typ)
			}
		}
		for _, typ := range c.write {
			if !p.CanWrite(typ) {
				t.Errorf("%q: cannot write %s", c.scope, typ)
			}
		}
		if p.Patient != c.patient || p.AccessAll != c.accessAll || p.HasAccessScope != c.hasAccess {
			t.Errorf("%q: patient %v accessAll %v hasAccess %v", c.scope, p.Patient, p.AccessAll, p.HasAccessScope)
		}
		if !slices.Equal(p.Access, c.access) || !slices.Equal(p.AccessWrite, c.accessWrite) {
			t.Errorf("%q: access %v write %v", c.scope, p.Access, p.AccessWrite)
		}
	}
	p := ParseScopes("u", "access/a.read access/b.*")
	if !p.CanSee([]string{"b"}) || p.CanSee([]string{"c"}) || p.CanSee(nil) {
		t.Error("CanSee")
	}
	if !p.CanTag([]string{"b"}) || p.CanTag([]string{"a"}) || !p.CanTag(nil) {
		t.Error("CanTag")
	}
	if codes := ParseScopes("u", "system/*.read").AccessCodes(); codes == nil || len(codes) != 0 {
		t.Errorf("no access scope must mean no tenant, got %v", codes)
	}
	if ParseScopes("u", "access/*.read").AccessCodes() != nil {
		t.Error("access/*.read must mean every tenant")
	}
}

// TestPatientScopesNeedAContext: patient/ scopes grant the resources of
// their patient's compartment only, and nothing without a patient context;
// beside a system/ scope for the type, the system scope decides.
func TestPatientScopesNeedAContext(t *testing.T) {
	obs := func(patient string) []byte {
		return []byte(`{"resourceType":"Observation","id":"o","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/` + patient + `"}}`)
	}
	lab := []byte(`{"resourceType":"Observation","id":"l","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p2"},` +
		`"category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}]}`)
	pat := func(id string) []byte { return []byte(`{"resourceType":"Patient","id":"` + id + `"}`) }
	p := ParseScopes("u", "patient/*.rs patient/Observation.cud")
	if p.CanRead("Observation") || p.CanWrite("Observation") || p.Matches(ActRead, "Observation", obs("p1")) {
		t.Fatal("patient/ scopes without a patient context grant something")
	}
	p.PatientContext = "p1"
	for _, c := range []struct {
		typ  string
		body []byte
		want bool
	}{{"Observation", obs("p1"), true}, {"Observation", obs("p2"), false}, {"Patient", pat("p1"), true}, {"Patient", pat("p2"), false}} {
		if got := p.Matches(ActRead, c.typ, c.body); got != c.want || !p.CanRead(c.typ) || !p.Restricted(ActRead, c.typ) {
			t.Errorf("patient p1 reading %s: %v, want %v", c.body, got, c.want)
		}
	}
	if pid, only := p.PatientOnly(ActRead, "Observation"); !only || pid != "p1" {
		t.Errorf("PatientOnly: %q %v", pid, only)
	}
	if pid, only := p.WritesOnlyPatient("Observation"); !only || pid != "p1" || !p.CanWrite("Observation") || p.CanWrite("Patient") {
		t.Errorf("WritesOnlyPatient: %q %v", pid, only)
	}
	// A system/ filtered scope beside it: lab Observations of anyone, and p1's others.
	q := ParseScopes("u", "patient/Observation.rs system/Observation.rs?category=laboratory")
	q.PatientContext = "p1"
	if !q.Matches(ActRead, "Observation", lab) || !q.Matches(ActRead, "Observation", obs("p1")) || q.Matches(ActRead, "Observation", obs("p2")) {
		t.Error("patient/ beside a filtered system/ scope")
	}
	if _, only := q.PatientOnly(ActRead, "Observation"); only {
		t.Error("a system/ grant beside the patient/ one: not only the patient's compartment")
	}
	// An unfiltered system/ scope: every Observation, whatever the context.
	sys := ParseScopes("u", "patient/Observation.rs system/Observation.rs")
	sys.PatientContext = "p1"
	if sys.Restricted(ActRead, "Observation") || !sys.Matches(ActRead, "Observation", obs("p2")) {
		t.Error("system/Observation.rs beside patient/: restricted")
	}
}

// TestReadAndSearchApart: SMART v2 .r grants reading by id and not search,
// .s search and not reading by id; v1 .read and v2 .rs grant both; the
// same holds for filtered scopes.
func TestReadAndSearchApart(t *testing.T) {
	lab := []byte(`{"resourceType":"Observation","id":"1","status":"final","category":[{"coding":[{"code":"laboratory"}]}],"code":{"text":"x"}}`)
	for _, c := range []struct {
		scope        string
		read, search bool
	}{
		{"system/Observation.r", true, false},
		{"system/Observation.s", false, true},
		{"system/Observation.rs", true, true},
		{"system/Observation.read", true, true},
		{"system/*.r", true, false},
		{"system/Observation.r?category=laboratory", true, false},
		{"system/Observation.s?category=laboratory", false, true},
	} {
		p := ParseScopes("u", c.scope)
		if p.CanRead("Observation") != c.read || p.CanSearch("Observation") != c.search {
			t.Errorf("%s: read %v search %v, want %v %v", c.scope, p.CanRead("Observation"), p.CanSearch("Observation"), c.read, c.search)
		}
		if p.Matches(ActRead, "Observation", lab) != c.read || p.Matches(ActSearch, "Observation", lab) != c.search {
			t.Errorf("%s: matches read %v search %v", c.scope, p.Matches(ActRead, "Observation", lab), p.Matches(ActSearch, "Observation", lab))
		}
	}
}

func TestScopeFilters(t *testing.T) {
	lab := []byte(`{"resourceType":"Observation","id":"1","status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}],"code":{"text":"x"}}`)
	vital := []byte(`{"resourceType":"Observation","id":"2","status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],"code":{"text":"x"}}`)
	p := ParseScopes("u", "system/Observation.rs?category=laboratory system/Observation.rs?status=amended system/Patient.rs")
	if !p.Matches(ActRead, "Observation", lab) || p.Matches(ActRead, "Observation", vital) || !p.Matches(ActRead, "Patient", vital) {
		t.Error("a filtered scope does not select by its query")
	}
	if got := p.Filters("Observation"); len(got) != 2 || got[0] != "category=laboratory" || got[1] != "status=amended" {
		t.Errorf("filters %v", got)
	}
	if p.Filters("Patient") != nil || len(p.FilteredTypes()) != 1 {
		t.Errorf("unfiltered Patient has filters %v; filtered types %v", p.Filters("Patient"), p.FilteredTypes())
	}
	// An unfiltered read scope for the type wins over its filtered ones.
	p = ParseScopes("u", "system/Observation.rs?category=laboratory system/Observation.read")
	if !p.Matches(ActRead, "Observation", vital) || p.Filters("Observation") != nil {
		t.Error("an unfiltered scope does not lift the filter")
	}
	if p := ParseScopes("u", "system/Observation.rs?category=laboratory"); p.Matches(ActRead, "Observation", []byte("not json")) {
		t.Error("an undecodable body matches a filter")
	}
}

// TestScopeAlgebra: v1 and v2 spellings mean the same grants, wildcards and
// narrowing are covered by meaning, and Grant keeps what is covered.
func TestScopeAlgebra(t *testing.T) {
	same := [][2]string{
		{"system/*.read", "system/*.rs"},
		{"system/*.write", "system/*.cud"},
		{"system/*.*", "system/*.cruds"},
		{"user/Observation.read", "user/Observation.rs"},
		{"patient/Patient.*", "patient/Patient.cruds"},
		{"access/a.read", "access/a.rs"},
	}
	for _, p := range same {
		a, errA := ParseScope(p[0])
		b, errB := ParseScope(p[1])
		if errA != nil || errB != nil || a != b {
			t.Errorf("%s and %s: %+v %v, %+v %v", p[0], p[1], a, errA, b, errB)
		}
	}
	for _, bad := range []string{"openid", "launch/patient", "system/*", "system/*.", "system/*.sr", "system/*.rr", "system/*.x", "system/.rs", "fhirUser", "other/*.rs", "system/Bad-Type!.rs", "system/Observation.rs?"} {
		if sc, err := ParseScope(bad); err == nil {
			t.Errorf("%q parsed as %+v", bad, sc)
		}
	}
	covers := []struct {
		held, asked string
		want        bool
	}{
		{"system/*.read", "system/*.rs", true},
		{"system/*.rs", "system/*.read", true},
		{"system/*.read", "system/Patient.rs", true},
		{"system/*.read", "system/Patient.r", true},
		{"system/*.read", "system/Observation.rs?category=laboratory", true},
		{"system/Observation.rs?category=laboratory", "system/Observation.rs", false},
		{"system/Observation.rs?category=laboratory", "system/Observation.rs?category=laboratory", true},
		{"system/Observation.rs?category=laboratory", "system/Observation.rs?category=vital-signs", false},
		{"system/Patient.rs", "system/*.rs", false},
		{"system/Patient.rs", "system/Observation.rs", false},
		{"system/*.read", "system/*.write", false},
		{"system/*.read", "system/*.cruds", false},
		{"system/*.*", "system/Patient.cud", true},
		{"user/*.read", "system/*.read", false},
		{"system/*.read", "user/*.read", false},
		{"access/*.read", "access/tenantA.read", true},
		{"access/tenantA.read", "access/tenantB.read", false},
		{"access/tenantA.read", "access/tenantA.write", false},
	}
	for _, c := range covers {
		held, _ := ParseScope(c.held)
		asked, _ := ParseScope(c.asked)
		if got := held.Covers(asked); got != c.want {
			t.Errorf("%s covers %s: %v, want %v", c.held, c.asked, got, c.want)
		}
	}
	grants := []struct {
		registered, requested, granted string
		dropped                        []string
		err                            bool
	}{
		{"system/*.read", "system/*.rs", "system/*.rs", nil, false},
		{"system/*.rs", "system/*.read", "system/*.read", nil, false},
		{"system/*.read", "system/Patient.rs system/Observation.rs", "system/Patient.rs system/Observation.rs", nil, false},
		{"system/*.read access/*.read", "system/Observation.rs access/*.read", "system/Observation.rs access/*.read", nil, false},
		{"system/*.read", "system/*.rs openid launch system/*.write", "system/*.rs", []string{"openid", "launch", "system/*.write"}, false},
		{"system/*.read", "system/*.rs system/*.rs", "system/*.rs", nil, false},
		{"system/*.read", "system/*.write", "", []string{"system/*.write"}, true},
		{"system/*.read", "", "", nil, true},
		{"system/*.read", "   ", "", nil, true},
		{"openid", "openid", "", []string{"openid"}, true},
	}
	for _, g := range grants {
		granted, dropped, err := Grant(g.registered, g.requested)
		if granted != g.granted || !slices.Equal(dropped, g.dropped) || (err != nil) != g.err {
			t.Errorf("Grant(%q, %q) = %q %q %v, want %q %q err %v", g.registered, g.requested, granted, dropped, err, g.granted, g.dropped, g.err)
		}
	}
}

// TestTenancy: without access/ scopes a token reads every tenant under
// TenancyNone and none under TenancyAccessTags; with them, only theirs.
func TestTenancy(t *testing.T) {
	for _, c := range []struct {
		scope     string
		tenancy   kiln.Tenancy
		seesA     bool
		seesB     bool
		writesB   bool
		noTenancy bool
	}{
		{"system/*.rs", kiln.TenancyNone, true, true, true, false},
		{"system/*.rs", kiln.TenancyAccessTags, false, false, false, true},
		{"system/*.rs access/a.read", kiln.TenancyNone, true, false, false, false},
		{"system/*.rs access/a.read", kiln.TenancyAccessTags, true, false, false, false},
		{"system/*.* access/a.*", kiln.TenancyNone, true, false, false, false},
		{"system/*.rs access/*.read", kiln.TenancyAccessTags, true, true, false, false},
	} {
		p := ParseScopes("u", c.scope).Under(c.tenancy)
		if p.CanSee([]string{"a"}) != c.seesA || p.CanSee([]string{"b"}) != c.seesB || p.CanTag([]string{"b"}) != c.writesB || p.ReadsNoTenant() != c.noTenancy {
			t.Errorf("%q under %s: sees a %v b %v, writes b %v, reads no tenant %v", c.scope, c.tenancy, p.CanSee([]string{"a"}), p.CanSee([]string{"b"}), p.CanTag([]string{"b"}), p.ReadsNoTenant())
		}
	}
	if _, err := kiln.ParseTenancy("helix"); err == nil {
		t.Error("an unknown tenancy was accepted")
	}
	if tn, err := kiln.ParseTenancy(""); err != nil || tn != kiln.TenancyNone {
		t.Errorf("default tenancy %q %v", tn, err)
	}
}

// TestStrongEnough: weak keys are refused wherever Kiln reads a JWKS.
func TestStrongEnough(t *testing.T) {
	weak := `{"keys":[{"kty":"RSA","kid":"w","n":"AaWL","e":"AQAB"}]}` // a 17-bit modulus
	if _, err := ParseJWKS([]byte(weak)); err == nil || !strings.Contains(err.Error(), "17 bits") {
		t.Errorf("a 17-bit RSA key: %v", err)
	}
	k1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	k2048, _ := rsa.GenerateKey(rand.Reader, 2048)
	ec384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	for _, c := range []struct {
		name string
		key  any
		ok   bool
	}{
		{"RSA 1024", k1024.Public(), false},
		{"RSA 2048", k2048.Public(), true},
		{"EC P-384", ec384.Public(), true},
	} {
		b, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: c.key, KeyID: "k"}}})
		if _, err := ParseJWKS(b); (err == nil) != c.ok {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	if err := StrongEnough(&ecdsa.PublicKey{Curve: elliptic.P224()}); err == nil {
		t.Error("P-224 accepted")
	}
}
