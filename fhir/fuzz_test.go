package fhir

import (
	"bufio"
	"compress/gzip"
	"encoding/json"
	"net/url"
	"os"
	"path/filepath"
	"testing"

	"github.com/kiln-fhir/kiln"
)

// seedLines adds the first lines of each Synthea type as fuzz seeds.
func seedLines(f *testing.F, perFile int) {
	files, _ := filepath.Glob(filepath.Join("..", "..", "shared", "data", "synthea-r4-10", "*.ndjson.gz"))
	for _, name := range files {
		fh, err := os.Open(name)
		if err != nil {
			continue
		}
		zr, err := gzip.NewReader(fh)
		if err == nil {
			sc := bufio.NewScanner(zr)
			sc.Buffer(make([]byte, 1<<20), 16<<20)
			for i := 0; i < perFile && sc.Scan(); i++ {
				f.Add(append([]byte(nil), sc.Bytes()...))
			}
		}
		fh.Close()
	}
}

// FuzzParse: validation never panics; what it accepts encodes to valid JSON
// that parses again to the same canonical bytes.
func FuzzParse(f *testing.F) {
	seedLines(f, 2)
	f.Add([]byte(`{"resourceType":"Patient","name":[{"given":["a",null]}]}`))
	f.Add([]byte(`{"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient"}}]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		p, err := Parse(body)
		if err != nil {
			return
		}
		id := p.ID
		if id == "" {
			id = "x"
		}
		w := Prepare(p, id, Options{Bases: []string{"http://h/4_0_0"}})
		out := SpliceMeta(w.Body, w.MetaAt, w.MetaEmpty, "1", "2020-01-01T00:00:00.000Z")
		if !json.Valid(out) {
			t.Fatalf("canonical bytes are not JSON: %s", out)
		}
		again, err := Parse(out)
		if err != nil {
			t.Fatalf("canonical form does not parse: %v: %s", err, out)
		}
		w2 := Prepare(again, id, Options{Bases: []string{"http://h/4_0_0"}})
		if string(w2.Body) != string(w.Body) {
			t.Fatalf("canonical form is not stable:\n%s\n%s", w.Body, w2.Body)
		}
	})
}

// FuzzParseDateTime: dates and instants (search and _since values) never panic,
// and a parsed period is never empty.
func FuzzParseDateTime(f *testing.F) {
	for _, s := range []string{"2023", "2023-10", "2023-10-10", "2023-10-10T10:00:00Z", "2023-10-10T10:00:00.123+02:00", "2023-10-10T10:00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		start, end, _, err := ParseDateTime(s)
		if err == nil && !end.After(start) {
			t.Fatalf("%q: empty period [%v, %v)", s, start, end)
		}
	})
}

// FuzzParseQuery: search and _typeFilter parsing never panic and refuse bad
// input with EINVALID; what parses can be evaluated on a resource.
func FuzzParseQuery(f *testing.F) {
	f.Add("Observation", "code=http://loinc.org|8867-4&date=ge2020-01&value-quantity=lt5||mg")
	f.Add("Observation", "patient=Patient/1,2&subject:Patient=3&_lastUpdated=gt2024-01-01T00:00:00Z")
	f.Add("Condition", "clinical-status:not=resolved&code:text=diab&onset-date=ap2019")
	f.Add("Patient", "name:contains=an&birthdate=sa1990&gender:missing=false&_id=a\\,b")
	f.Add("Observation?category=laboratory", "")
	f.Fuzz(func(t *testing.T, typ, query string) {
		res := map[string]any{}
		if err := json.Unmarshal([]byte(`{"resourceType":"Observation","id":"o","status":"final","subject":{"reference":"Patient/1"},"code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"valueQuantity":{"value":4,"unit":"mg","system":"http://unitsofmeasure.org","code":"mg"},"effectiveDateTime":"2020-02-01"}`), &res); err != nil {
			t.Fatal(err)
		}
		check := func(q *Query, err error) {
			if err != nil {
				if c := kiln.ErrorCode(err); c != kiln.EINVALID {
					t.Fatalf("error code %s for a bad query: %v", c, err)
				}
				return
			}
			q.Match(res)
		}
		if vals, err := url.ParseQuery(query); err == nil && R4().IsResourceType(typ) {
			check(ParseQuery(typ, vals, false))
		}
		check(ParseTypeFilter(typ + query))
	})
}
