package fhir

import (
	"bufio"
	"compress/gzip"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
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
