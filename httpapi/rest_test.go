package httpapi_test

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln/httpapi"
)

func TestRESTRoundTrip(t *testing.T) {
	e := newEnv(t, envOpts{})
	ct := []string{"Content-Type", "application/fhir+json"}

	r := e.do("POST", "/Patient", []byte(`{"resourceType":"Patient","id":"ignored","name":[{"family":"Ada"}]}`), ct...)
	if r.StatusCode != 201 || r.Header.Get("ETag") != `W/"1"` {
		t.Fatalf("create: %d %v %s", r.StatusCode, r.Header, r.body)
	}
	loc := r.Header.Get("Location")
	id := r.json(t)["id"].(string)
	if id == "ignored" || !strings.HasSuffix(loc, "/Patient/"+id+"/_history/1") || !strings.HasPrefix(loc, "http://") {
		t.Fatalf("POST keeps a server id: id %s, Location %s", id, loc)
	}
	r = e.do("PUT", "/Patient/"+id, []byte(fmt.Sprintf(`{"resourceType":"Patient","id":%q,"name":[{"family":"Lovelace"}]}`, id)), ct...)
	if r.StatusCode != 200 || r.Header.Get("ETag") != `W/"2"` {
		t.Fatalf("update: %d %s", r.StatusCode, r.body)
	}
	r = e.do("PUT", "/Patient/new-one", []byte(`{"resourceType":"Patient","name":[{"family":"New"}]}`), ct...)
	if r.StatusCode != 201 {
		t.Fatalf("PUT create: %d %s", r.StatusCode, r.body)
	}
	if r := e.do("PUT", "/Patient/"+id, []byte(`{"resourceType":"Patient","gender":"male"}`), append(ct, "If-Match", `W/"1"`)...); r.StatusCode != 412 {
		t.Fatalf("stale If-Match: %d %s", r.StatusCode, r.body)
	}
	if r := e.do("GET", "/Patient/"+id, nil); r.StatusCode != 200 || !strings.Contains(string(r.body), "Lovelace") || r.Header.Get("Last-Modified") == "" {
		t.Fatalf("read: %d %s", r.StatusCode, r.body)
	}
	if r := e.do("GET", "/Patient/"+id+"/_history/1", nil); r.StatusCode != 200 || !strings.Contains(string(r.body), `"family":"Ada"`) {
		t.Fatalf("vread 1: %d %s", r.StatusCode, r.body)
	}
	if r := e.do("DELETE", "/Patient/"+id, nil); r.StatusCode != 204 {
		t.Fatalf("delete: %d", r.StatusCode)
	}
	if r := e.do("GET", "/Patient/"+id, nil); r.StatusCode != 410 {
		t.Fatalf("read deleted: %d", r.StatusCode)
	}
	h := e.do("GET", "/Patient/"+id+"/_history", nil).json(t)
	if h["type"] != "history" || h["total"].(float64) != 3 {
		t.Fatalf("history: %v", h)
	}
	entries := h["entry"].([]any)
	if req := entries[0].(map[string]any)["request"].(map[string]any); req["method"] != "DELETE" {
		t.Fatalf("newest history entry: %v", req)
	}
	if r := e.do("GET", "/Patient/nobody", nil); r.StatusCode != 404 {
		t.Fatalf("missing: %d", r.StatusCode)
	}
}

func TestRESTRejectsBadInput(t *testing.T) {
	e := newEnv(t, envOpts{httpCfg: httpapi.Config{MaxBodyBytes: 4096}})
	ct := []string{"Content-Type", "application/fhir+json"}
	big := `{"resourceType":"Patient","name":[{"family":"` + strings.Repeat("x", 5000) + `"}]}`
	cases := []struct {
		method, path, body string
		status             int
		want               string
	}{
		{"POST", "/Patient", `[]`, 400, "not a JSON object"},
		{"POST", "/Patient", `{"resourceType":`, 400, "not valid JSON"},
		{"POST", "/Patient", `{"resourceType":"Observation","status":"final","code":{"text":"x"}}`, 400, "does not match"},
		{"POST", "/Patient", `{"resourceType":"Bogus"}`, 400, "unknown resourceType"},
		{"POST", "/Patient", `{"resourceType":"Patient","name":"Ada"}`, 400, "@Patient.name"},
		{"POST", "/Patient", `{"resourceType":"Patient","birthDate":true}`, 400, "@Patient.birthDate"},
		{"POST", "/Patient", big, 413, "larger than the limit"},
		{"PUT", "/Patient/a%20b", `{"resourceType":"Patient"}`, 400, "@id"},
		{"PUT", "/Patient/" + strings.Repeat("x", 65), `{"resourceType":"Patient"}`, 400, "@id"},
		{"PUT", "/Patient/p1", `{"resourceType":"Patient","id":"p2"}`, 400, "does not match"},
		{"GET", "/Bogus/1", "", 404, "not an R4 resource type"},
		{"GET", "/Patient/1/_history/x", "", 400, "@vid"},
		{"GET", "/Patient?nickname=x", "", 400, "@nickname"},
		{"GET", "/Patient?_sort=name", "", 400, "@_sort"},
		{"GET", "/Patient?gender:bogus=x", "", 400, "@gender:bogus"},
		{"GET", "/Patient?birthdate=yesterday", "", 400, "@birthdate"},
		{"GET", "/Patient?_count=x", "", 400, "@_count"},
		{"GET", "/Patient?_lastUpdated=zz2020", "", 400, "@_lastUpdated"},
		{"POST", "/", `{"resourceType":"Bundle","type":"collection"}`, 400, "batch or transaction"},
		{"POST", "/", `{"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient"},"request":{"method":"PATCH","url":"Patient/1"}}]}`, 400, "not supported"},
	}
	for _, c := range cases {
		var body []byte
		if c.body != "" {
			body = []byte(c.body)
		}
		r := e.do(c.method, c.path, body, ct...)
		if r.StatusCode != c.status {
			t.Errorf("%s %s: %d, want %d: %s", c.method, c.path, r.StatusCode, c.status, r.body)
			continue
		}
		if txt := r.outcomeText(t); !strings.Contains(txt, c.want) {
			t.Errorf("%s %s: %q lacks %q", c.method, c.path, txt, c.want)
		}
	}
	if r := e.do("POST", "/Patient", []byte(`<Patient/>`), "Content-Type", "application/fhir+xml"); r.StatusCode != http.StatusUnsupportedMediaType {
		t.Errorf("XML body: %d", r.StatusCode)
	}
	// Nothing from those requests was stored.
	if r := e.do("GET", "/Patient", nil).json(t); r["total"].(float64) != 0 {
		t.Errorf("rejected requests stored %v patients", r["total"])
	}
}

func TestTransactionAtomicAndBatch(t *testing.T) {
	e := newEnv(t, envOpts{})
	ct := []string{"Content-Type", "application/fhir+json"}
	tx := `{"resourceType":"Bundle","type":"transaction","entry":[
		{"fullUrl":"urn:uuid:11111111-1111-1111-1111-111111111111","resource":{"resourceType":"Patient","name":[{"family":"T"}]},"request":{"method":"POST","url":"Patient"}},
		{"resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"urn:uuid:11111111-1111-1111-1111-111111111111"}},"request":{"method":"POST","url":"Observation"}},
		{"resource":{"resourceType":"Observation","status":"final","code":{"text":"y"},"valueQuantity":{"value":"high"}},"request":{"method":"POST","url":"Observation"}}]}`
	r := e.do("POST", "/", []byte(tx), ct...)
	if r.StatusCode != 400 || !strings.Contains(r.outcomeText(t), "Bundle.entry[2]") {
		t.Fatalf("bad transaction: %d %s", r.StatusCode, r.body)
	}
	for _, typ := range []string{"Patient", "Observation"} {
		if n := e.do("GET", "/"+typ, nil).json(t)["total"].(float64); n != 0 {
			t.Fatalf("failed transaction stored %v %s", n, typ)
		}
	}
	good := strings.Replace(tx, `,"valueQuantity":{"value":"high"}`, "", 1)
	r = e.do("POST", "/", []byte(good), ct...)
	if r.StatusCode != 200 {
		t.Fatalf("transaction: %d %s", r.StatusCode, r.body)
	}
	resp := r.json(t)
	loc := resp["entry"].([]any)[0].(map[string]any)["response"].(map[string]any)["location"].(string)
	pid := strings.Split(loc, "/")[1]
	page := e.do("GET", "/Observation?_count=10", nil).json(t)
	for _, en := range page["entry"].([]any) {
		subj := en.(map[string]any)["resource"].(map[string]any)["subject"]
		if subj != nil && subj.(map[string]any)["reference"] != "Patient/"+pid {
			t.Fatalf("urn:uuid reference not rewritten: %v", subj)
		}
	}
	// The Observation is in the new patient's compartment.
	m := e.mustComplete(e.kickOff("GET", "/Patient/$export?_type=Observation&patient="+pid, nil))
	if len(m.Output) != 1 || m.Output[0].Count != 1 {
		t.Fatalf("compartment of the transaction's patient: %+v", m.Output)
	}
	batch := `{"resourceType":"Bundle","type":"batch","entry":[
		{"resource":{"resourceType":"Patient","id":"b1"},"request":{"method":"PUT","url":"Patient/b1"}},
		{"resource":{"resourceType":"Patient","gender":"x"},"request":{"method":"PUT","url":"Patient/b2"}},
		{"request":{"method":"DELETE","url":"Patient/b1"}}]}`
	r = e.do("POST", "/", []byte(batch), ct...)
	if r.StatusCode != 200 {
		t.Fatalf("batch: %d %s", r.StatusCode, r.body)
	}
	var statuses []string
	for _, en := range r.json(t)["entry"].([]any) {
		statuses = append(statuses, en.(map[string]any)["response"].(map[string]any)["status"].(string))
	}
	if strings.Join(statuses, ",") != "201,400,204" {
		t.Fatalf("batch statuses %v", statuses)
	}
}

func TestSearchPaging(t *testing.T) {
	e := newEnv(t, envOpts{})
	for i := range 5 {
		e.do("PUT", fmt.Sprintf("/Group/g%d", i), []byte(fmt.Sprintf(`{"resourceType":"Group","type":"person","actual":true,"identifier":[{"system":"urn:g","value":"v%d"}]}`, i%2)), "Content-Type", "application/fhir+json")
	}
	b := e.do("GET", "/Group?identifier=urn:g|v1", nil).json(t)
	if b["total"].(float64) != 2 {
		t.Fatalf("identifier search: %v", b["total"])
	}
	var ids []string
	next := e.base + "/Group?_count=2"
	for next != "" {
		b := e.do("GET", next, nil).json(t)
		next = ""
		for _, l := range b["link"].([]any) {
			if lm := l.(map[string]any); lm["relation"] == "next" {
				next = lm["url"].(string)
			}
		}
		for _, en := range b["entry"].([]any) {
			ids = append(ids, en.(map[string]any)["resource"].(map[string]any)["id"].(string))
		}
	}
	if strings.Join(ids, ",") != "g0,g1,g2,g3,g4" {
		t.Fatalf("paged ids %v", ids)
	}
	if b := e.do("GET", "/Group?_id=g3,g4&_lastUpdated=gt2000-01-01", nil).json(t); b["total"].(float64) != 2 {
		t.Fatalf("_id search: %v", b["total"])
	}
	if b := e.do("GET", "/Group?_lastUpdated=lt2000-01-01", nil).json(t); b["total"].(float64) != 0 {
		t.Fatalf("_lastUpdated lt: %v", b["total"])
	}
	root := strings.TrimSuffix(e.base, "/4_0_0")
	for _, p := range []string{"/healthz", "/readyz"} {
		if r := e.do("GET", root+p, nil); r.StatusCode != 200 {
			t.Fatalf("%s: %d", p, r.StatusCode)
		}
	}
}

// TestSearchByPatient: patient-linked reference searches are narrowed by the
// compartment index and still evaluated exactly.
func TestSearchByPatient(t *testing.T) {
	e := newEnv(t, envOpts{})
	put := func(path, body string) {
		if r := e.do("PUT", path, []byte(body), "Content-Type", "application/fhir+json"); r.StatusCode >= 300 {
			t.Fatalf("PUT %s: %d", path, r.StatusCode)
		}
	}
	put("/Patient/p1", `{"resourceType":"Patient"}`)
	put("/Patient/p2", `{"resourceType":"Patient"}`)
	put("/Group/p1", `{"resourceType":"Group","type":"person","actual":true}`)
	obs := func(id, field, ref string) {
		put("/Observation/"+id, fmt.Sprintf(`{"resourceType":"Observation","status":"final","code":{"text":"x"},%q:%s}`, field, ref))
	}
	obs("o1", "subject", `{"reference":"Patient/p1"}`)
	obs("o2", "subject", `{"reference":"Patient/p2"}`)
	obs("o3", "performer", `[{"reference":"Patient/p1"}]`) // in p1's compartment, not its subject
	obs("o4", "subject", `{"reference":"Group/p1"}`)
	for q, want := range map[string]string{
		"patient=p1":                         "o1",
		"patient=Patient/p1,Patient/p2":      "o1,o2",
		"subject=p1":                         "o1,o4", // any type with id p1
		"subject:Patient=p1":                 "o1",
		"subject:Group=p1":                   "o4",
		"performer=Patient/p1":               "o3",
		"patient=p1&_id=o1,o2":               "o1",
		"patient=nobody":                     "",
		"patient=p1&code:text=nothing-named": "",
	} {
		b := e.do("GET", "/Observation?"+q, nil).json(t)
		var ids []string
		entries, _ := b["entry"].([]any)
		for _, en := range entries {
			ids = append(ids, en.(map[string]any)["resource"].(map[string]any)["id"].(string))
		}
		slices.Sort(ids)
		if got := strings.Join(ids, ","); got != want {
			t.Errorf("Observation?%s: %q, want %q", q, got, want)
		}
		if total, ok := b["total"].(float64); ok && int(total) != len(ids) {
			t.Errorf("Observation?%s: total %v for %d entries", q, total, len(ids))
		}
	}
	for _, q := range []string{"patient:Group=p1", "subject:Patient=Patient/p1"} {
		name, _, _ := strings.Cut(q, "=")
		if r := e.do("GET", "/Observation?"+q, nil); r.StatusCode != 400 || !strings.Contains(string(r.body), `"expression":["`+name+`"]`) {
			t.Errorf("Observation?%s: %d %s", q, r.StatusCode, r.body)
		}
	}
}
