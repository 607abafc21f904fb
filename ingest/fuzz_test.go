package ingest

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// FuzzPrepareBundle: transaction processing never panics, every entry either
// carries an error or a write of a valid type and id, and urn: references are rewritten.
func FuzzPrepareBundle(f *testing.F) {
	f.Add([]byte(`{"resourceType":"Bundle","type":"transaction","entry":[{"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},{"resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"urn:uuid:1"}},"request":{"method":"POST","url":"Observation"}}]}`))
	f.Add([]byte(`{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"DELETE","url":"Patient/1"}},{"resource":{"resourceType":"Patient","id":"2"},"request":{"method":"PUT","url":"Patient/2"}}]}`))
	f.Add([]byte(`{"resourceType":"Bundle","type":"transaction","entry":[null,1,"x",{"request":{}}]}`))
	n := 0
	f.Fuzz(func(t *testing.T, body []byte) {
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.UseNumber()
		var m map[string]any
		if dec.Decode(&m) != nil {
			return
		}
		_, entries, err := PrepareBundle(m, BundleOptions{NewID: func() string { n++; return "gen" + string(rune('a'+n%26)) }})
		if err != nil {
			return
		}
		for _, e := range entries {
			if e.Err != nil {
				if kiln.ErrorCode(e.Err) != kiln.EINVALID {
					t.Fatalf("entry %d: %v", e.Index, e.Err)
				}
				continue
			}
			if !fhir.R4().IsResourceType(e.Write.Type) || !fhir.ValidID(e.Write.ID) {
				t.Fatalf("entry %d: write of %q/%q", e.Index, e.Write.Type, e.Write.ID)
			}
			if bytes.Contains(e.Write.Body, []byte(`"reference":"urn:uuid:1"`)) && bytes.Contains(body, []byte(`"fullUrl":"urn:uuid:1"`)) {
				t.Fatalf("entry %d kept a reference to a Bundle-local fullUrl: %s", e.Index, e.Write.Body)
			}
		}
	})
}
