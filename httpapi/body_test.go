package httpapi_test

import (
	"strings"
	"testing"
)

// TestJSONBodyBounds (issue 17, finding 9): a body of very many tiny JSON
// values, or one nested too deep, is refused before it is decoded — 413 or
// 400 with an OperationOutcome saying which limit — while a body at the
// limits is accepted.
func TestJSONBodyBounds(t *testing.T) {
	e := newEnv(t, envOpts{})
	// A batch of 600,000 empty objects: 1.8 MB, well under the byte limit,
	// over a million values.
	tiny := `{"resourceType":"Bundle","type":"batch","entry":[` + strings.Repeat(`{},`, 600_000) + `{}]}`
	res := e.do("POST", "/", []byte(tiny), "Content-Type", "application/fhir+json")
	if res.StatusCode != 413 || !strings.Contains(string(res.body), "values; at most 1000000") {
		t.Errorf("a million tiny values: %d %.300s, want 413 naming the value limit", res.StatusCode, res.body)
	}
	deep := `{"resourceType":"Basic","id":"d","code":{"text":"x"},"extension":[` + strings.Repeat(`{"extension":[`, 120) + strings.Repeat(`]}`, 120) + `]}`
	res = e.do("PUT", "/Basic/d", []byte(deep), "Content-Type", "application/fhir+json")
	if res.StatusCode != 400 || !strings.Contains(string(res.body), "nests") {
		t.Errorf("nested 240 deep: %d %.300s, want 400 naming the depth", res.StatusCode, res.body)
	}
	ok := `{"resourceType":"Basic","id":"ok","code":{"text":"x"},"extension":[` + strings.Repeat(`{"url":"http://x","extension":[`, 40) + `{"url":"http://y","valueString":"z"}` + strings.Repeat(`]}`, 40) + `]}`
	if res := e.do("PUT", "/Basic/ok", []byte(ok), "Content-Type", "application/fhir+json"); res.StatusCode != 201 {
		t.Errorf("nested 82 deep: %d %.300s, want 201", res.StatusCode, res.body)
	}
}

// TestConditionalBundleEntriesAreRefused (issue 17): a transaction entry
// with ifNoneExist (or ifMatch, …) is refused with a 400 naming it, and the
// transaction stores nothing — ignoring it would create a duplicate.
func TestConditionalBundleEntriesAreRefused(t *testing.T) {
	e := newEnv(t, envOpts{})
	tx := `{"resourceType":"Bundle","type":"transaction","entry":[
		{"resource":{"resourceType":"Patient","id":"ok1"},"request":{"method":"PUT","url":"Patient/ok1"}},
		{"resource":{"resourceType":"Patient","identifier":[{"system":"s","value":"1"}]},"request":{"method":"POST","url":"Patient","ifNoneExist":"identifier=s|1"}}]}`
	res := e.do("POST", "/", []byte(tx), "Content-Type", "application/fhir+json")
	if res.StatusCode != 400 || !strings.Contains(string(res.body), "Bundle.entry[1].request.ifNoneExist") {
		t.Fatalf("transaction with ifNoneExist: %d %.300s, want 400 naming it", res.StatusCode, res.body)
	}
	if res := e.do("GET", "/Patient/ok1", nil); res.StatusCode != 404 {
		t.Errorf("the refused transaction stored its other entry: %d", res.StatusCode)
	}
}
