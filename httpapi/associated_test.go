package httpapi_test

import (
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln"
)

// TestIncludeAssociatedDataHTTP: over HTTP, on the store under test, a
// tenant's export with includeAssociatedData gets the Provenance of its
// exported resources and no other tenant's; a token without Provenance
// scopes gets none and an error-file line; an unknown value is 400, or an
// error-file line under lenient handling.
func TestIncludeAssociatedDataHTTP(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	admin := bearer(r.token(t, "admin", "system/*.* access/tenantA.* access/tenantB.*"))
	aliceTok := r.token(t, "alice", "system/*.read access/tenantA.read")
	alice := bearer(aliceTok)
	olga := r.token(t, "olga", "system/Observation.read access/tenantA.read")
	meta := func(tenant string) string {
		return fmt.Sprintf(`"meta":{"security":[{"system":%q,"code":%q}]}`, kiln.AccessSystem, tenant)
	}
	prov := func(id, tenant, recorded string, targets ...string) (string, []byte) {
		var ts []string
		for _, tg := range targets {
			ts = append(ts, fmt.Sprintf(`{"reference":%q}`, tg))
		}
		return "/Provenance/" + id, []byte(fmt.Sprintf(`{"resourceType":"Provenance","id":%q,%s,"target":[%s],"recorded":%q,"agent":[{"who":{"reference":"Organization/o1"}}]}`,
			id, meta(tenant), strings.Join(ts, ","), recorded))
	}
	puts := [][2]any{
		{"/Observation/a1", tenantObs("a1", "x", "tenantA")},
		{"/Observation/b1", tenantObs("b1", "x", "tenantB")},
		{"/Condition/c1", []byte(`{"resourceType":"Condition","id":"c1",` + meta("tenantA") + `,"subject":{"reference":"Patient/p1"}}`)},
		// A patient's Observation and the Organization it references (a
		// supporting resource of a Patient export).
		{"/Patient/pA", []byte(`{"resourceType":"Patient","id":"pA",` + meta("tenantA") + `}`)},
		{"/Organization/orgA", []byte(`{"resourceType":"Organization","id":"orgA",` + meta("tenantA") + `,"name":"A"}`)},
		{"/Observation/a2", []byte(`{"resourceType":"Observation","id":"a2",` + meta("tenantA") + `,"status":"final","code":{"text":"x"},"subject":{"reference":"Patient/pA"},"performer":[{"reference":"Organization/orgA"}]}`)},
	}
	for _, p := range [][]any{
		{"pa", "tenantA", "2020-01-01T00:00:00Z", []string{"Observation/a1"}},
		{"pa2", "tenantA", "2021-01-01T00:00:00Z", []string{"Observation/a1"}},
		{"pb", "tenantB", "2022-01-01T00:00:00Z", []string{"Observation/a1", "Observation/b1"}},
		{"pc", "tenantA", "2020-01-01T00:00:00Z", []string{"Condition/c1"}},
		{"pa3", "tenantA", "2020-01-01T00:00:00Z", []string{"Observation/a2"}},
		{"porg", "tenantA", "2020-01-01T00:00:00Z", []string{"Organization/orgA"}},
	} {
		u, b := prov(p[0].(string), p[1].(string), p[2].(string), p[3].([]string)...)
		puts = append(puts, [2]any{u, b})
	}
	for _, p := range puts {
		if res := r.do("PUT", p[0].(string), p[1].([]byte), admin...); res.StatusCode/100 != 2 {
			t.Fatalf("PUT %s: %d %s", p[0], res.StatusCode, res.body)
		}
	}
	for _, tc := range []struct {
		mode string
		want []string
	}{{"RelevantProvenanceResources", []string{"pa", "pa2", "pa3"}}, {"LatestProvenanceResources", []string{"pa2", "pa3"}}} {
		loc := r.kickOff("GET", "/$export?_type=Observation&includeAssociatedData="+tc.mode, nil, alice...)
		m := r.mustCompleteAuth(loc, aliceTok)
		got := r.idsAuth(m, aliceTok)
		sort.Strings(got["Observation"])
		if !slices.Equal(got["Observation"], []string{"a1", "a2"}) {
			t.Errorf("%s: Observations %v", tc.mode, got["Observation"])
		}
		sort.Strings(got["Provenance"])
		if !slices.Equal(got["Provenance"], tc.want) {
			t.Errorf("%s: Provenance %v, want %v", tc.mode, got["Provenance"], tc.want)
		}
		if q, err := url.Parse(m.Request); err != nil || q.Query().Get("includeAssociatedData") != tc.mode {
			t.Errorf("manifest request %q does not echo includeAssociatedData", m.Request)
		}
	}

	// A Patient export: the Provenance of the patient's Observation and of
	// the Organization exported with it, not those of other Observations.
	m := r.mustCompleteAuth(r.kickOff("GET", "/Patient/$export?_type=Observation,Organization&includeAssociatedData=RelevantProvenanceResources", nil, alice...), aliceTok)
	got := r.idsAuth(m, aliceTok)
	sort.Strings(got["Provenance"])
	if !slices.Equal(got["Observation"], []string{"a2"}) || !slices.Equal(got["Organization"], []string{"orgA"}) || !slices.Equal(got["Provenance"], []string{"pa3", "porg"}) {
		t.Errorf("Patient export: %v", got)
	}

	loc := r.kickOff("GET", "/$export?_type=Observation&includeAssociatedData=RelevantProvenanceResources", nil, bearer(olga)...)
	m = r.mustCompleteAuth(loc, olga)
	if got := r.idsAuth(m, olga); len(got["Provenance"]) != 0 || len(m.Error) != 1 {
		t.Fatalf("token without Provenance: Provenance %v, error files %+v", got["Provenance"], m.Error)
	}
	if l := r.linesAuth(m.Error[0].URL, olga); len(l) != 1 || !strings.Contains(string(l[0]), "Provenance") {
		t.Errorf("error file %s", l)
	}

	if res := r.do("GET", "/$export?includeAssociatedData=Everything", nil, append(alice, "Accept", "application/fhir+json", "Prefer", "respond-async")...); res.StatusCode != 400 ||
		!strings.Contains(string(res.body), "includeAssociatedData") {
		t.Errorf("unknown value, strict: %d %s", res.StatusCode, res.body)
	}
	loc = r.kickOff("GET", "/$export?_type=Observation&includeAssociatedData=Everything", nil, append(alice, "Prefer", "respond-async, handling=lenient")...)
	m = r.mustCompleteAuth(loc, aliceTok)
	if got := r.idsAuth(m, aliceTok); len(got["Provenance"]) != 0 || len(got["Observation"]) != 2 || len(m.Error) != 1 {
		t.Fatalf("unknown value, lenient: %v, error files %+v", got, m.Error)
	}
	if l := r.linesAuth(m.Error[0].URL, aliceTok); len(l) != 1 || !strings.Contains(string(l[0]), `"Everything`) || !strings.Contains(string(l[0]), `"expression":["includeAssociatedData"]`) {
		t.Errorf("error file %s", l)
	}
}

// TestLenientMissingPatientsHTTP: patient= ids that do not exist (or are
// another tenant's) are 400 naming them; under lenient handling the export
// holds the patients that exist and the error file one line per missing id.
func TestLenientMissingPatientsHTTP(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	admin := bearer(r.token(t, "admin", "system/*.* access/tenantA.* access/tenantB.*"))
	aliceTok := r.token(t, "alice", "system/*.read access/tenantA.read")
	alice := bearer(aliceTok)
	for id, tenant := range map[string]string{"p1": "tenantA", "p2": "tenantB"} {
		body := fmt.Sprintf(`{"resourceType":"Patient","id":%q,"meta":{"security":[{"system":%q,"code":%q}]}}`, id, kiln.AccessSystem, tenant)
		if res := r.do("PUT", "/Patient/"+id, []byte(body), admin...); res.StatusCode/100 != 2 {
			t.Fatalf("PUT Patient/%s: %d %s", id, res.StatusCode, res.body)
		}
	}
	path := "/Patient/$export?patient=Patient/p1,Patient/nobody,Patient/p2"
	res := r.do("GET", path, nil, append(alice, "Accept", "application/fhir+json", "Prefer", "respond-async")...)
	if res.StatusCode != 400 || !strings.Contains(string(res.body), "Patient/nobody") || !strings.Contains(string(res.body), "Patient/p2") {
		t.Fatalf("strict: %d %s", res.StatusCode, res.body)
	}
	m := r.mustCompleteAuth(r.kickOff("GET", path, nil, append(alice, "Prefer", "respond-async, handling=lenient")...), aliceTok)
	if got := r.idsAuth(m, aliceTok); !slices.Equal(got["Patient"], []string{"p1"}) {
		t.Errorf("lenient: Patients %v, want [p1]", got["Patient"])
	}
	if len(m.Error) != 1 {
		t.Fatalf("error files %+v", m.Error)
	}
	var lines []string
	for _, l := range r.linesAuth(m.Error[0].URL, aliceTok) {
		lines = append(lines, string(l))
	}
	all := strings.Join(lines, "\n")
	if len(lines) != 2 || !strings.Contains(all, "Patient/nobody does not exist") || !strings.Contains(all, "Patient/p2 does not exist") {
		t.Errorf("error file:\n%s", all)
	}
}

// idsAuth downloads every output file with tok and returns the ids per type.
func (r *authRig) idsAuth(m manifest, tok string) map[string][]string {
	r.t.Helper()
	out := map[string][]string{}
	for _, it := range m.Output {
		for _, l := range r.linesAuth(it.URL, tok) {
			var res struct{ ResourceType, ID string }
			if err := json.Unmarshal(l, &res); err != nil || res.ResourceType != it.Type {
				r.t.Fatalf("%s: line %s in a %s file", it.URL, l, it.Type)
			}
			out[it.Type] = append(out[it.Type], res.ID)
		}
	}
	return out
}
