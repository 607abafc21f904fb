package fhirpath

import (
	"testing"
)

// FuzzFHIRPath: any text either fails to parse or evaluates without
// panicking; what parses prints back as given.
func FuzzFHIRPath(f *testing.F) {
	for _, s := range []string{"name.where(use = 'official').given.first()", "value.ofType(Quantity).value * 2 > 1.5",
		"(a | b).count() div 0", "%c.substring(1, 2) & 'x'", "@2020-01.highBoundary()", "extension('u').value",
		"iif(active, 1, {}) mod -3", "getResourceKey() = link.other.getReferenceKey(Patient)", "a[0][1].b.not() implies c ~ 'X'"} {
		f.Add(s)
	}
	res := Of(map[string]any{"resourceType": "Patient", "id": "p", "active": true, "a": []any{"x", "y"},
		"name": []any{map[string]any{"use": "official", "given": []any{"g"}}}, "valueQuantity": map[string]any{"value": "3"},
		"birthDate": "2020-02", "extension": []any{map[string]any{"url": "u", "valueString": "s"}}})
	env := &Env{Constants: map[string][]Item{"c": {{V: "abc", T: "string"}}}}
	f.Fuzz(func(t *testing.T, s string) {
		e, err := Parse(s)
		if err != nil {
			return
		}
		if e.String() != s {
			t.Fatalf("String() = %q, parsed %q", e.String(), s)
		}
		e.Eval(res, env)
	})
}
