package fhir

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
)

func TestDefinitions(t *testing.T) {
	d := R4()
	if len(d.Resources) != 145 {
		t.Errorf("R4 has 145 resource types, table has %d", len(d.Resources))
	}
	if len(d.Compartment) != 66 && len(d.Compartment) != 67 {
		t.Errorf("compartment types: %d", len(d.Compartment))
	}
	for typ, want := range map[string]map[string][]string{
		"Observation": {"subject": {"subject"}, "performer": {"performer"}},
		"Claim":       {"patient": {"patient"}, "payee": {"payee.party"}},
		"Encounter":   {"subject": {"subject"}},
		"Patient":     {"link": {"link.other"}},
	} {
		for param, paths := range want {
			if got := d.Compartment[typ][param]; !slices.Equal(got, paths) {
				t.Errorf("%s.%s paths = %v, want %v", typ, param, got, paths)
			}
		}
	}
	if d.InCompartment("Practitioner") || !d.InCompartment("Observation") {
		t.Error("compartment membership of types is wrong")
	}
}

func TestParseRejects(t *testing.T) {
	cases := []struct {
		body, expr, msg string
	}{
		{`[1,2]`, "", "not a JSON object"},
		{`{"resourceType":"Patient"`, "", "not valid JSON"},
		{`{"resourceType":"Patient"} {}`, "", "data after"},
		{`{"id":"x"}`, "resourceType", "no resourceType"},
		{`{"resourceType":"Pateint"}`, "resourceType", "unknown resourceType"},
		{`{"resourceType":"Patient","id":"a b"}`, "Patient.id", "1-64"},
		{`{"resourceType":"Patient","name":{"family":"x"}}`, "Patient.name", "must be a JSON array"},
		{`{"resourceType":"Patient","gender":"bogus"}`, "Patient.gender", "not one of the allowed codes"},
		{`{"resourceType":"Patient","active":"yes"}`, "Patient.active", "true or false"},
		{`{"resourceType":"Patient","birthDate":19700101}`, "Patient.birthDate", "JSON string"},
		{`{"resourceType":"Patient","nickname":"x"}`, "Patient.nickname", "unknown element"},
		{`{"resourceType":"Patient","name":[{"given":"x"}]}`, "Patient.name[0].given", "must be a JSON array"},
		{`{"resourceType":"Observation","status":"final"}`, "Observation.code", "required"},
		{`{"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient","gender":1}}]}`, "Bundle.entry[0].resource(Patient).gender", "JSON string"},
		{`{"resourceType":"Patient","name":[]}`, "Patient.name", "empty array"},
		{`{"resourceType":"Patient","text":{"status":"generated","div":""}}`, "Patient.text.div", "empty string"},
	}
	for _, c := range cases {
		_, err := Parse([]byte(c.body))
		var e *kiln.Error
		if err == nil || !asError(err, &e) || e.Code != kiln.EINVALID {
			t.Errorf("%s: want EINVALID, got %v", c.body, err)
			continue
		}
		if !strings.Contains(e.Message, c.msg) {
			t.Errorf("%s: message %q lacks %q", c.body, e.Message, c.msg)
		}
		if c.expr != "" && (len(e.Expression) == 0 || e.Expression[0] != c.expr) {
			t.Errorf("%s: expression %v, want %s", c.body, e.Expression, c.expr)
		}
	}
}

func asError(err error, e **kiln.Error) bool {
	x, ok := err.(*kiln.Error)
	*e = x
	return ok
}

func TestParseAccepts(t *testing.T) {
	for _, body := range []string{
		`{"resourceType":"Patient","id":"p-1.a","name":[{"given":["A",null],"_given":[null,{"extension":[{"url":"u","valueString":"x"}]}]}]}`,
		`{"resourceType":"Observation","status":"final","code":{"text":"t"},"valueQuantity":{"value":1.50,"unit":"kg"}}`,
	} {
		if _, err := Parse([]byte(body)); err != nil {
			t.Errorf("%s: %v", body, err)
		}
	}
}

func TestCanonicalEncodingAndMeta(t *testing.T) {
	a, err := Parse([]byte(`{"gender":"male","resourceType":"Patient","id":"x","meta":{"tag":[{"code":"t"}],"versionId":"9"},"text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">a &amp; b</div>"},"extension":[{"url":"u","valueDecimal":1.50}]}`))
	if err != nil {
		t.Fatal(err)
	}
	w := Prepare(a, "x", Options{})
	got := string(SpliceMeta(w.Body, w.MetaAt, w.MetaEmpty, "3", "2024-01-01T00:00:00.000Z"))
	want := `{"resourceType":"Patient","id":"x","meta":{"versionId":"3","lastUpdated":"2024-01-01T00:00:00.000Z","tag":[{"code":"t"}]},"text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">a &amp; b</div>"},"extension":[{"url":"u","valueDecimal":1.50}],"gender":"male"}`
	if got != want {
		t.Fatalf("canonical body:\n got %s\nwant %s", got, want)
	}
	if !json.Valid([]byte(got)) {
		t.Fatal("not valid JSON")
	}
	b, _ := Parse([]byte(`{"resourceType":"Patient","id":"x"}`))
	w2 := Prepare(b, "x", Options{})
	if got := string(SpliceMeta(w2.Body, w2.MetaAt, w2.MetaEmpty, "1", "t")); got != `{"resourceType":"Patient","id":"x","meta":{"versionId":"1","lastUpdated":"t"}}` {
		t.Fatalf("resource without meta: %s", got)
	}
}

func TestExtract(t *testing.T) {
	opt := Options{Bases: []string{"https://kiln.example/4_0_0"}}
	p, err := Parse([]byte(`{"resourceType":"Observation","id":"o","status":"final","code":{"text":"x"},
		"subject":{"reference":"https://kiln.example/4_0_0/Patient/p1"},
		"performer":[{"reference":"Patient/p2/_history/3"},{"reference":"Practitioner/dr"},{"reference":"#contained"},{"reference":"https://other.example/Patient/p9"}],
		"hasMember":[{"reference":"Observation/o2"}],
		"meta":{"security":[{"system":"https://www.icanbwell.com/access","code":"tenantA"},{"system":"other","code":"x"}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	r := Extract("Observation", "o", p.Map, opt)
	if !slices.Equal(r.Patients, []string{"p1", "p2"}) {
		t.Errorf("patients %v", r.Patients)
	}
	if !slices.Equal(r.Supporting, []kiln.Ref{{Type: "Practitioner", ID: "dr"}}) {
		t.Errorf("supporting %v", r.Supporting)
	}
	if !slices.Equal(r.AccessCodes, []string{"tenantA"}) {
		t.Errorf("access codes %v", r.AccessCodes)
	}
	dev, _ := Parse([]byte(`{"resourceType":"Device","id":"d","patient":{"reference":"Patient/p1"}}`))
	if r := Extract("Device", "d", dev.Map, opt); len(r.Patients) != 0 || !slices.Equal(r.PatientRefs, []string{"p1"}) {
		t.Errorf("device: %+v", r)
	}
}

func TestParseDateTime(t *testing.T) {
	cases := []struct {
		in         string
		start, end string
	}{
		{"2023", "2023-01-01T00:00:00Z", "2024-01-01T00:00:00Z"},
		{"2023-10", "2023-10-01T00:00:00Z", "2023-11-01T00:00:00Z"},
		{"2023-10-10", "2023-10-10T00:00:00Z", "2023-10-11T00:00:00Z"},
		{"2023-10-10T10:00:00+02:00", "2023-10-10T08:00:00Z", "2023-10-10T08:00:01Z"},
		{"2023-10-10T10:00:00.123Z", "2023-10-10T10:00:00.123Z", "2023-10-10T10:00:00.123000001Z"},
	}
	for _, c := range cases {
		s, e, _, err := ParseDateTime(c.in)
		if err != nil {
			t.Errorf("%s: %v", c.in, err)
			continue
		}
		if s.Format(time.RFC3339Nano) != c.start || e.Format(time.RFC3339Nano) != c.end {
			t.Errorf("%s: [%s, %s), want [%s, %s)", c.in, s.Format(time.RFC3339Nano), e.Format(time.RFC3339Nano), c.start, c.end)
		}
	}
	for _, bad := range []string{"", "yesterday", "2023-13-01", "2023-02-30", "10/10/2023", "2023-10-10T25:00:00Z"} {
		if _, _, _, err := ParseDateTime(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}
