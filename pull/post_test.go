package pull_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/pull"
)

// TestPostKickOffCarriesEveryParameterInTheBody: a strict server that reads
// only the Parameters body (and refuses a query string) gets every parameter.
func TestPostKickOffCarriesEveryParameterInTheBody(t *testing.T) {
	var got map[string][]string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.RawQuery != "" {
			t.Errorf("kick-off %s with query %q", r.Method, r.URL.RawQuery)
		}
		b, _ := io.ReadAll(r.Body)
		ps, err := export.ParametersBody(b)
		if err != nil {
			t.Errorf("body: %v", err)
		}
		got = map[string][]string{}
		for _, p := range ps {
			got[p[0]] = append(got[p[0]], p[1])
		}
		w.Header().Set("Content-Location", "http://"+r.Host+"/status")
		w.WriteHeader(http.StatusAccepted)
	}))
	defer srv.Close()
	req := pull.Request{Server: srv.URL, Level: "patient", Types: []string{"Patient", "Condition"}, Since: "2026-01-01T00:00:00Z",
		Until: "2026-06-01T00:00:00Z", TypeFilters: []string{"Condition?clinical-status=active"}, Elements: []string{"id"},
		Patients: []string{"p1", "Patient/p2"}, IncludeAssociatedData: []string{"LatestProvenanceResources"}}
	if _, err := pull.New(pull.Options{Out: t.TempDir()}).Start(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{"_type": {"Patient,Condition"}, "_since": {req.Since}, "_until": {req.Until},
		"_typeFilter": {"Condition?clinical-status=active"}, "_elements": {"id"}, "patient": {"Patient/p1", "Patient/p2"},
		"includeAssociatedData": {"LatestProvenanceResources"}}
	for k, v := range want {
		if len(got[k]) != len(v) || (len(v) > 0 && got[k][0] != v[0]) || (len(v) > 1 && got[k][1] != v[1]) {
			t.Errorf("%s: got %v, want %v", k, got[k], v)
		}
	}
	// --post without patients is a POST too.
	req.Patients = nil
	req.Post = true
	if _, err := pull.New(pull.Options{Out: t.TempDir()}).Start(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if got["_type"] == nil {
		t.Errorf("--post: _type not in the body: %v", got)
	}
}

// TestKickOffHonoursRetryAfter: 429 and 503 at kick-off are waited out as
// Retry-After says (seconds or an HTTP date), through the injected sleeper.
func TestKickOffHonoursRetryAfter(t *testing.T) {
	var n int
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n++
		switch n {
		case 1:
			w.Header().Set("Retry-After", "7")
			w.WriteHeader(http.StatusTooManyRequests)
		case 2:
			w.Header().Set("Retry-After", time.Now().Add(30*time.Second).UTC().Format(http.TimeFormat))
			w.WriteHeader(http.StatusServiceUnavailable)
		default:
			w.Header().Set("Content-Location", "http://"+r.Host+"/status")
			w.WriteHeader(http.StatusAccepted)
		}
	}))
	defer srv.Close()
	var waits []time.Duration
	c := pull.New(pull.Options{Out: t.TempDir(), Sleep: func(_ context.Context, d time.Duration) error { waits = append(waits, d); return nil }})
	if _, err := c.Start(context.Background(), pull.Request{Server: srv.URL}); err != nil {
		t.Fatalf("kick-off through 429 and 503: %v", err)
	}
	if len(waits) != 2 || waits[0] != 7*time.Second || waits[1] < 20*time.Second || waits[1] > 31*time.Second {
		t.Fatalf("waits %v, want 7s then about 30s", waits)
	}
}

// TestWrongCountOnAnErrorFileIsNotAFailure: the error file's count is off;
// the pull still completes.
func TestWrongCountOnAnErrorFileIsNotAFailure(t *testing.T) {
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/$export":
			w.Header().Set("Content-Location", srv.URL+"/status")
			w.WriteHeader(http.StatusAccepted)
		case "/status":
			io.WriteString(w, `{"transactionTime":"2026-01-01T00:00:00Z","request":"x","output":[],
				"error":[{"type":"OperationOutcome","url":"`+srv.URL+`/err","count":5}]}`)
		case "/err":
			io.WriteString(w, `{"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"processing","diagnostics":"x"}]}`+"\n")
		}
	}))
	defer srv.Close()
	c := pull.New(pull.Options{Out: t.TempDir(), Sleep: func(context.Context, time.Duration) error { return nil }})
	st, err := c.Start(context.Background(), pull.Request{Server: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Wait(context.Background(), st)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := c.Download(context.Background(), st, m); err != nil || res.Errors != 1 {
		t.Fatalf("error file with a wrong count: %v %+v", err, res)
	}
}
