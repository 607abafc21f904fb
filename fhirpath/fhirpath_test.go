package fhirpath

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

const patient = `{"resourceType":"Patient","id":"p1","active":true,"birthDate":"1970-06-02",
 "name":[{"use":"official","family":"Ng","given":["A","B"]},{"use":"nickname","given":["Al"]}],
 "deceasedBoolean":false,
 "extension":[{"url":"u1","valueCode":"F"},{"url":"u2","valueQuantity":{"value":1.50}}],
 "generalPractitioner":[{"reference":"http://x/fhir/Practitioner/d1/_history/3"},{"reference":"#c1"}]}`

func decode(t *testing.T, s string) map[string]any {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader([]byte(s)))
	d.UseNumber()
	var m map[string]any
	if err := d.Decode(&m); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestEval checks operators and functions the specification's suite does
// not reach, on one resource; results are shown as their values.
func TestEval(t *testing.T) {
	res := Of(decode(t, patient))
	for _, tc := range []struct{ expr, want string }{
		{"Patient.name.given", "[A B Al]"},
		{"name.given | name.given", "[A B Al]"},
		{"name.given.combine(name.given).count()", "[6]"},
		{"name.where(use = 'official').given.last()", "[B]"},
		{"name[1].given.first() & '-' & {}", "[Al-]"},
		{"{} and false", "[false]"},
		{"{} and true", "[]"},
		{"{} or true", "[true]"},
		{"false implies {}", "[true]"},
		{"true xor true", "[false]"},
		{"(1 + 2 * 3) div 2", "[3]"},
		{"7 mod 4 - -1", "[4]"},
		{"10 / 4", "[2.5]"},
		{"1 / 0", "[]"},
		{"'abc' + 'd'", "[abcd]"},
		{"deceased.ofType(boolean)", "[false]"},
		{"deceased is boolean", "[true]"},
		{"(deceased as string).exists()", "[false]"},
		{"extension('u2').value.ofType(Quantity).value", "[1.50]"},
		{"extension('u1').value.ofType(code) = 'F'", "[true]"},
		{"generalPractitioner.getReferenceKey()", "[Practitioner/d1]"},
		{"generalPractitioner.getReferenceKey(Patient)", "[]"},
		{"getResourceKey()", "[Patient/p1]"},
		{"birthDate = @1970-06-02", "[true]"},
		{"birthDate = @1970-06", "[]"},
		{"birthDate < @1971-01-01", "[true]"},
		{"'Ng' in name.family", "[true]"},
		{"name.family contains 'Xu'", "[false]"},
		{"name.family.first().upper().startsWith('N')", "[true]"},
		{"'a,b'.split(',').count()", "[2]"},
		{"'hello'.substring(1, 3)", "[ell]"},
		{"'hello'.replace('l', 'L').length()", "[5]"},
		{"'x1'.matches('^x[0-9]$')", "[true]"},
		{"name.select(given.first())", "[A Al]"},
		{"name.all(given.exists())", "[true]"},
		{"name.exists(family = 'Ng')", "[true]"},
		{"iif(active, 'yes', 'no')", "[yes]"},
		{"name.given.skip(1).take(1)", "[B]"},
		{"repeat($this).count()", "[1]"},
		{"name.repeat(given).count()", "[3]"},
		{"'ABC' ~ 'abc'", "[true]"},
		{"1.0 = 1", "[true]"},
		{"birthDate.highBoundary()", "[1970-06-02]"},
		{"@2020-02.highBoundary()", "[2020-02-29]"},
	} {
		e, err := Parse(tc.expr)
		if err != nil {
			t.Errorf("%s: %v", tc.expr, err)
			continue
		}
		out, err := e.Eval(res, &Env{})
		if err != nil {
			t.Errorf("%s: %v", tc.expr, err)
			continue
		}
		var vals []any
		for _, it := range out {
			vals = append(vals, it.V)
		}
		if got := fmt.Sprint(vals); got != tc.want && !(got == "[]" && tc.want == "[]") {
			t.Errorf("%s = %s, want %s", tc.expr, got, tc.want)
		}
	}
}

func TestParseErrors(t *testing.T) {
	deep := strings.Repeat("(", 100000) + "1" + strings.Repeat(")", 100000)
	if _, err := Parse(deep); err == nil || !strings.Contains(err.Error(), "nested") {
		t.Errorf("100000 nested parentheses: %v", err)
	}
	for _, s := range []string{"@@", "name.", "name[0", "nosuch()", "first(1)", "'open", "a +", "(a", "a ^ b"} {
		if _, err := Parse(s); err == nil {
			t.Errorf("%q parsed", s)
		}
	}
}
