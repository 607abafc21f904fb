package fhir

import (
	"bufio"
	"compress/gzip"
	"encoding/json"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// synthea returns a resource of the 10-patient set by type and id.
func synthea(t *testing.T, typ, id string) map[string]any {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "..", "shared", "data", "synthea-r4-10", typ+".ndjson.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, _ := gzip.NewReader(f)
	sc := bufio.NewScanner(zr)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		if !strings.Contains(sc.Text(), `"id":"`+id+`"`) {
			continue
		}
		dec := json.NewDecoder(strings.NewReader(sc.Text()))
		dec.UseNumber()
		var m map[string]any
		dec.Decode(&m)
		return m
	}
	t.Fatalf("%s/%s not in the Synthea set", typ, id)
	return nil
}

// Hand-checked facts of three Synthea resources:
//   - Observation cdec68f5…: vital-signs, LOINC 8302-2 "Body Height", 181.2 cm,
//     effective 2011-02-02T16:30:49-05:00, subject Patient/6c5d9ca9…, status final;
//   - Patient 6c5d9ca9…: Mr. Abram Lemke, male, born 1965-01-13, Easthampton;
//   - Encounter 17b801ac…: class AMB, SNOMED 185345009, period 1985-06-18
//     17:30:49 to 17:45:49 (-04:00).
func TestSearchParameterTypes(t *testing.T) {
	obs := synthea(t, "Observation", "cdec68f5-5a6a-4861-b26b-f4061ff4f2f9")
	pat := synthea(t, "Patient", "6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2")
	enc := synthea(t, "Encounter", "17b801ac-58e3-4f6b-8b48-8e33f3a36086")
	obs["meta"] = map[string]any{"lastUpdated": "2024-03-01T10:00:00.000Z", "tag": []any{map[string]any{"system": "urn:t", "code": "x"}}}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cases := []struct {
		res   map[string]any
		query string
		want  bool
	}{
		// token
		{obs, "code=8302-2", true},
		{obs, "code=http://loinc.org|8302-2", true},
		{obs, "code=http://snomed.info/sct|8302-2", false},
		{obs, "code=|8302-2", false},
		{obs, "code=http://loinc.org|", true},
		{obs, "code=29463-7,8302-2", true},
		{obs, "code=29463-7", false},
		{obs, "code:not=29463-7", true},
		{obs, "code:not=8302-2", false},
		{obs, "code:text=body", true},
		{obs, "code:text=weight", false},
		{obs, "category=vital-signs", true},
		{obs, "category=laboratory", false},
		{obs, "status=final", true},
		{obs, "status=preliminary", false},
		{pat, "gender=male", true},
		{pat, "identifier=http://hospital.smarthealthit.org|6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2", true},
		{pat, "_id=6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2", true},
		{enc, "class=AMB", true},
		{enc, "type=http://snomed.info/sct|185345009", true},
		{obs, "_tag=urn:t|x", true},
		{obs, "_tag=urn:t|y", false},
		// reference
		{obs, "subject=Patient/6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2", true},
		{obs, "subject=6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2", true},
		{obs, "patient=Patient/6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2", true},
		{obs, "subject=http://kiln.test/4_0_0/Patient/6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2", true},
		{obs, "subject=Patient/other", false},
		{obs, "encounter=Encounter/7518242e-0b07-41d2-8c40-8acd1e3a7bb9", true},
		// date, with prefixes and partial dates (2011-02-02T21:30:49Z)
		{obs, "date=2011", true},
		{obs, "date=2011-02", true},
		{obs, "date=2011-02-02", true},
		{obs, "date=2011-02-03", false},
		{obs, "date=eq2011-02-02", true},
		{obs, "date=ne2011-02-02", false},
		{obs, "date=gt2011-01-31", true},
		{obs, "date=gt2011-02-02", false},
		{obs, "date=lt2011-02-03", true},
		{obs, "date=lt2011-02-02", false},
		{obs, "date=ge2011-02-02", true},
		{obs, "date=ge2011-02-03", false},
		{obs, "date=le2011-02-02", true},
		{obs, "date=le2011-02-01", false},
		{obs, "date=sa2011-02-01", true},
		{obs, "date=sa2011-02-02", false},
		{obs, "date=eb2011-02-03", true},
		{obs, "date=eb2011-02-02", false},
		{obs, "date=ap2011-02-04", true},
		{obs, "date=ap2013-02-02", false},
		{obs, "date=ge2011-02-02T21:30:00Z&date=le2011-02-02T21:31:00Z", true},
		{pat, "birthdate=1965-01-13", true},
		{pat, "birthdate=lt1965", false},
		{enc, "date=1985-06-18", true},
		{enc, "date=2011-02-02", false},
		{enc, "date=ge2011-01-01", false},
		{enc, "date=lt1990", true},
		{enc, "date=1985-06-18T21:40:00Z", false},
		{enc, "date=ap1985-06-20", true},
		{obs, "_lastUpdated=gt2024-03-01T09:00:00Z", true},
		{obs, "_lastUpdated=lt2024-03-01", false},
		// string
		{pat, "family=Lem", true},
		{pat, "family=lemke", true},
		{pat, "family=emke", false},
		{pat, "family:exact=Lemke", true},
		{pat, "family:exact=lemke", false},
		{pat, "family:contains=emk", true},
		{pat, "name=Abram", true},
		{pat, "name=Mr", true},
		{pat, "address-city=easth", true},
		{pat, "address-city=Boston", false},
		// quantity and number
		{obs, "value-quantity=181.2", true},
		{obs, "value-quantity=181", true},
		{obs, "value-quantity=180", false},
		{obs, "value-quantity=gt180|http://unitsofmeasure.org|cm", true},
		{obs, "value-quantity=gt180||kg", false},
		{obs, "value-quantity=lt181", false},
		{obs, "value-quantity=le181.2", true},
		{obs, "value-quantity=ap200", true},
		// missing
		{obs, "value-concept:missing=true", true},
		{obs, "value-quantity:missing=true", false},
	}
	for _, c := range cases {
		params, _ := url.ParseQuery(c.query)
		q, err := ParseQuery(c.res["resourceType"].(string), params, false)
		if err != nil {
			t.Errorf("%s: %v", c.query, err)
			continue
		}
		q.Now = now
		if got := q.Match(c.res); got != c.want {
			t.Errorf("%s %s: matched %v, want %v", c.res["resourceType"], c.query, got, c.want)
		}
	}
}

func TestParseQueryRejects(t *testing.T) {
	for _, c := range []struct{ typ, query, want string }{
		{"Observation", "bogus=1", "no supported search parameter"},
		{"Observation", "code:exact=x", "modifier :exact"},
		{"Observation", "date=2020-13-01", "date=2020-13-01"},
		{"Observation", "value-quantity=abc", "value-quantity"},
		{"Observation", "_sort=date", "result parameter"},
		{"Observation", "_include=Observation:subject", "result parameter"},
		{"Observation", "code:missing=maybe", "true or false"},
		{"Nope", "a=b", "not an R4 resource type"},
	} {
		params, _ := url.ParseQuery(c.query)
		_, err := ParseQuery(c.typ, params, false)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s?%s: %v, want %q", c.typ, c.query, err, c.want)
		}
	}
	if _, err := ParseTypeFilter("Observation"); err == nil {
		t.Error("a _typeFilter without ? parsed")
	}
}

func TestPatientLinked(t *testing.T) {
	for _, c := range []struct {
		typ, code string
		want      bool
	}{
		{"Observation", "patient", true}, // subject.where(resolve() is Patient)
		{"Observation", "subject", true}, // a compartment param itself
		{"Observation", "performer", true},
		{"Observation", "focus", false}, // references a patient without linking the compartment
		{"Observation", "code", false},  // not a reference
		{"Encounter", "patient", true},
		{"Encounter", "location", false},
		{"Organization", "partof", false}, // Organization is not in the compartment
	} {
		if got := PatientLinked(c.typ, LookupParam(c.typ, c.code)); got != c.want {
			t.Errorf("PatientLinked(%s, %s) = %v, want %v", c.typ, c.code, got, c.want)
		}
	}
}
