package auth

import (
	"slices"
	"testing"
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
		{scope: "system/Observation.s", read: []string{"Observation"}},
		{scope: "system/Observation.c", write: []string{"Observation"}, notRead: []string{"Observation"}},
		{scope: "patient/*.read", read: []string{"Patient"}, patient: true},
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

func TestScopeFilters(t *testing.T) {
	lab := []byte(`{"resourceType":"Observation","id":"1","status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}],"code":{"text":"x"}}`)
	vital := []byte(`{"resourceType":"Observation","id":"2","status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],"code":{"text":"x"}}`)
	p := ParseScopes("u", "system/Observation.rs?category=laboratory system/Observation.rs?status=amended system/Patient.rs")
	if !p.Matches("Observation", lab) || p.Matches("Observation", vital) || !p.Matches("Patient", vital) {
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
	if !p.Matches("Observation", vital) || p.Filters("Observation") != nil {
		t.Error("an unfiltered scope does not lift the filter")
	}
	if p := ParseScopes("u", "system/Observation.rs?category=laboratory"); p.Matches("Observation", []byte("not json")) {
		t.Error("an undecodable body matches a filter")
	}
}
