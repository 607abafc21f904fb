package pull_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/httpapi"
	"github.com/kiln-fhir/kiln/ingest"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/pull"
	"github.com/kiln-fhir/kiln/sqlite"
)

type server struct {
	db     *sqlite.DB
	srv    *httptest.Server
	base   string
	files  atomic.Int32 // file GETs served
	client *ecdsa.PrivateKey
}

// newServer runs Kiln on the 10-patient Synthea set; with auth, a client
// "puller" with an ES384 key is registered.
func newServer(t *testing.T, withAuth bool) *server {
	dir := t.TempDir()
	db, err := sqlite.Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if _, err := ingest.Load(context.Background(), db, []string{filepath.Join("..", "..", "shared", "data", "synthea-r4-10")}, ingest.LoadOptions{NewID: uuid.NewString}); err != nil {
		t.Fatal(err)
	}
	s := &server{db: db}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	sink, _ := localfs.New(filepath.Join(dir, "exports"))
	s.srv = httptest.NewUnstartedServer(nil)
	s.base = "http://" + s.srv.Listener.Addr().String() + "/4_0_0"
	svc := export.New(db, db, sink, export.Config{Logger: log, Ref: fhir.Options{Bases: []string{s.base}}})
	hc := httpapi.Config{Logger: log, RetryAfter: 1, PollBurst: -1, KickOffsPerMinute: -1}
	if withAuth {
		key, _ := auth.LoadOrCreateKey(filepath.Join(dir, "key.pem"))
		v, err := auth.NewVerifier(auth.Config{Issuer: s.base, Key: key})
		if err != nil {
			t.Fatal(err)
		}
		root := strings.TrimSuffix(s.base, "/4_0_0")
		hc.Verifier, hc.Key, hc.RequiresAccessToken = v, key, true
		hc.Token = &auth.TokenServer{Verifier: v, Clients: db, URL: root + "/auth/token"}
		s.client, _ = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
		jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: s.client.Public(), KeyID: "k1", Algorithm: "ES384"}}})
		db.PutClient(context.Background(), &kiln.Client{ID: "puller", JWKS: jwks, Scope: "system/*.read access/*.read"})
	}
	api := httpapi.New(db, svc, hc, nil)
	s.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/file/") {
			s.files.Add(1)
		}
		api.ServeHTTP(w, r)
	})
	s.srv.Start()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); svc.Run(ctx) }()
	t.Cleanup(func() { s.srv.Close(); cancel(); wg.Wait() })
	return s
}

func (s *server) counts(t *testing.T) map[string]int64 {
	c, err := s.db.Counts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// local counts the lines per type in a pull folder.
func local(t *testing.T, dir string) map[string]int64 {
	out := map[string]int64{}
	files, _ := filepath.Glob(filepath.Join(dir, "*.ndjson"))
	for _, f := range files {
		base := filepath.Base(f)
		if strings.HasPrefix(base, "deleted.") || strings.HasPrefix(base, "error.") {
			continue
		}
		b, _ := os.ReadFile(f)
		out[strings.SplitN(base, ".", 2)[0]] += int64(strings.Count(string(b), "\n"))
	}
	return out
}

func pullAll(t *testing.T, c *pull.Client, req pull.Request) *pull.Result {
	t.Helper()
	st, err := c.Start(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Wait(context.Background(), st)
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.Download(context.Background(), st, m)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func TestPullLevels(t *testing.T) {
	s := newServer(t, false)
	want := s.counts(t)
	var groupID string
	page, _ := s.db.Search(context.Background(), kiln.SearchQuery{Type: "Group"})
	groupID = page.Resources[0].ID
	for _, req := range []pull.Request{
		{Server: s.base, Level: "system"},
		{Server: s.base, Level: "patient"},
		{Server: s.base, Level: "group", GroupID: groupID},
	} {
		dir := t.TempDir()
		res := pullAll(t, pull.New(pull.Options{Out: dir, Parallel: 3}), req)
		got := local(t, dir)
		var total int64
		for typ, n := range want {
			total += n
			if req.Level == "system" && got[typ] != n {
				t.Errorf("%s pull: %s %d lines, store %d", req.Level, typ, got[typ], n)
			}
		}
		if got["Patient"] != want["Patient"] || res.Resources == 0 {
			t.Errorf("%s pull: %d patients of %d, %d resources", req.Level, got["Patient"], want["Patient"], res.Resources)
		}
		if _, err := os.Stat(filepath.Join(dir, "manifest.json")); err != nil {
			t.Errorf("%s pull saved no manifest", req.Level)
		}
	}
	// _type and patient (a POST Parameters body).
	dir := t.TempDir()
	pats, _ := s.db.PatientsAt(context.Background(), time.Now().Add(time.Hour), nil)
	pullAll(t, pull.New(pull.Options{Out: dir}), pull.Request{Server: s.base, Level: "patient", Types: []string{"Patient"}, Patients: pats[:2]})
	if got := local(t, dir); got["Patient"] != 2 || len(got) != 1 {
		t.Errorf("patient + _type pull: %v", got)
	}
}

func TestPullWithBackendServices(t *testing.T) {
	s := newServer(t, true)
	root := strings.TrimSuffix(s.base, "/4_0_0")
	tu, err := pull.DiscoverTokenURL(context.Background(), http.DefaultClient, s.base)
	if err != nil || tu != root+"/auth/token" {
		t.Fatalf("discovery: %q %v", tu, err)
	}
	dir := t.TempDir()
	tokens := &pull.BackendServices{ClientID: "puller", Key: s.client, KeyID: "k1", TokenURL: tu, Scope: "system/*.read access/*.read"}
	pullAll(t, pull.New(pull.Options{Out: dir, Tokens: tokens}), pull.Request{Server: s.base, Types: []string{"Patient", "Condition"}})
	if got := local(t, dir); got["Patient"] != s.counts(t)["Patient"] {
		t.Errorf("authenticated pull: %v", got)
	}
	// Without a token the kick-off is refused, and the client says why.
	_, err = pull.New(pull.Options{Out: t.TempDir()}).Start(context.Background(), pull.Request{Server: s.base})
	if err == nil || !strings.Contains(err.Error(), "401") || !strings.Contains(err.Error(), "no bearer token") {
		t.Errorf("pull without a token: %v", err)
	}
}

func TestPullCancelAndResume(t *testing.T) {
	s := newServer(t, false)
	c := pull.New(pull.Options{Out: t.TempDir()})
	st, err := c.Start(context.Background(), pull.Request{Server: s.base})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Cancel(context.Background(), st); err != nil {
		t.Fatal(err)
	}
	res, _ := http.Get(st.StatusURL)
	res.Body.Close()
	if res.StatusCode != 404 {
		t.Fatalf("status after cancel: %d", res.StatusCode)
	}

	// A client killed after two files resumes: it downloads only what is missing.
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	var seen atomic.Int32
	interrupting := &http.Client{Transport: roundTrip(func(r *http.Request) (*http.Response, error) {
		if strings.Contains(r.URL.Path, "/file/") && seen.Add(1) > 2 {
			cancel()
			return nil, context.Canceled
		}
		return http.DefaultTransport.RoundTrip(r)
	})}
	c = pull.New(pull.Options{Out: dir, Parallel: 1, HTTP: interrupting})
	st, err = c.Start(ctx, pull.Request{Server: s.base})
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Wait(ctx, st)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Download(ctx, st, m); err == nil {
		t.Fatal("interrupted download reported success")
	}
	before := s.files.Load()
	c2 := pull.New(pull.Options{Out: dir, Parallel: 2})
	st2, err := c2.Resume()
	if err != nil || st2.StatusURL != st.StatusURL {
		t.Fatalf("resume state: %+v %v", st2, err)
	}
	m2, err := c2.Wait(context.Background(), st2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Download(context.Background(), st2, m2); err != nil {
		t.Fatal(err)
	}
	if fetched := int(s.files.Load() - before); fetched >= len(m2.Output) {
		t.Errorf("resume fetched %d of %d files: nothing was kept from the first run", fetched, len(m2.Output))
	}
	for typ, n := range s.counts(t) {
		if local(t, dir)[typ] != n {
			t.Errorf("after resume: %s %d lines, store %d", typ, local(t, dir)[typ], n)
		}
	}
}

type roundTrip func(*http.Request) (*http.Response, error)

func (f roundTrip) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func TestIncrementalPullAppliesDeletes(t *testing.T) {
	s := newServer(t, false)
	dir := t.TempDir()
	pullAll(t, pull.New(pull.Options{Out: dir}), pull.Request{Server: s.base, Types: []string{"Patient", "Condition"}})
	before := local(t, dir)
	// On the server: one Condition deleted, one Patient changed.
	conds, _ := s.db.Search(context.Background(), kiln.SearchQuery{Type: "Condition", Count: 1})
	pats, _ := s.db.Search(context.Background(), kiln.SearchQuery{Type: "Patient", Count: 1})
	if _, err := s.db.Write(context.Background(), []kiln.Write{{Kind: kiln.Delete, Type: "Condition", ID: conds.Resources[0].ID}}); err != nil {
		t.Fatal(err)
	}
	p, _ := fhir.Parse(pats.Resources[0].Body)
	p.Map["gender"] = "other"
	if _, err := s.db.Write(context.Background(), []kiln.Write{fhir.Prepare(p, p.ID, fhir.Options{})}); err != nil {
		t.Fatal(err)
	}
	since, err := pull.PreviousTransactionTime(dir)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Millisecond)
	c := pull.New(pull.Options{Out: dir})
	res := pullAll(t, c, pull.Request{Server: s.base, Types: []string{"Patient", "Condition"}, Since: since, Incremental: true})
	if res.Deleted != 1 || res.Resources != 1 {
		t.Fatalf("increment: %d deletions, %d resources", res.Deleted, res.Resources)
	}
	if res.Increment != (pull.Increment{Deleted: 1, Updated: 1, Removed: 2}) {
		t.Errorf("increment applied: %+v, want 1 deleted, 1 updated, 2 older lines removed", res.Increment)
	}
	after := local(t, dir)
	if after["Condition"] != before["Condition"]-1 || after["Patient"] != before["Patient"] {
		t.Fatalf("local copy: before %v, after %v", before, after)
	}
	all := ""
	files, _ := filepath.Glob(filepath.Join(dir, "Patient.*.ndjson"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		all += string(b)
	}
	if strings.Count(all, `"id":"`+p.ID+`"`) != 1 || !strings.Contains(all, `"gender":"other"`) {
		t.Fatal("the changed Patient is not there exactly once, in its new version")
	}
}

// TestPullAgainstAMisbehavingServer: 500s while polling, no Retry-After, a
// truncated file — the client retries through them; a file that stays
// truncated is reported clearly.
func TestPullAgainstAMisbehavingServer(t *testing.T) {
	var polls, gets atomic.Int32
	lines := `{"resourceType":"Patient","id":"a"}` + "\n" + `{"resourceType":"Patient","id":"b"}` + "\n"
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/fhir/$export":
			w.Header().Set("Content-Location", srv.URL+"/status")
			w.WriteHeader(202)
		case r.URL.Path == "/status":
			switch n := polls.Add(1); {
			case n <= 2:
				w.WriteHeader(500)
				io.WriteString(w, "boom")
			case n == 3:
				w.WriteHeader(202) // no Retry-After: the client backs off by itself
			default:
				fmt.Fprintf(w, `{"transactionTime":"2026-01-01T00:00:00Z","request":"x","requiresAccessToken":false,
					"output":[{"type":"Patient","url":"%s/good","count":2},{"type":"Patient","url":"%s/bad","count":2}],"error":[]}`, srv.URL, srv.URL)
			}
		case r.URL.Path == "/good":
			if gets.Add(1) == 1 {
				io.WriteString(w, lines[:20]) // cut mid-line the first time
				return
			}
			io.WriteString(w, lines)
		case r.URL.Path == "/bad":
			io.WriteString(w, lines[:len(lines)/2+5])
		}
	}))
	defer srv.Close()
	dir := t.TempDir()
	var said []string
	var mu sync.Mutex
	c := pull.New(pull.Options{Out: dir, MaxRetries: 3, Progress: func(s string) { mu.Lock(); said = append(said, s); mu.Unlock() },
		Sleep: func(context.Context, time.Duration) error { return nil }})
	st, err := c.Start(context.Background(), pull.Request{Server: srv.URL + "/fhir"})
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Wait(context.Background(), st)
	if err != nil {
		t.Fatalf("polling through 500s: %v", err)
	}
	_, err = c.Download(context.Background(), st, m)
	if err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("a file that stays truncated: %v", err)
	}
	if gets.Load() < 2 {
		t.Error("the truncated good file was not fetched again")
	}
	// The good file waits, verified, in the staging folder for a --resume;
	// nothing of the failed run is in the folder itself.
	good, _ := filepath.Glob(filepath.Join(dir, ".kiln-pull-staging", "Patient.*.001.ndjson"))
	if len(good) != 1 {
		t.Fatalf("the good file was not kept: %v", good)
	}
	if run, _ := filepath.Glob(filepath.Join(dir, "*.ndjson")); len(run) != 0 {
		t.Fatalf("files of a failed run in the folder: %v", run)
	}
	if parts, _ := filepath.Glob(filepath.Join(dir, ".kiln-pull-staging", "*.part")); len(parts) != 0 {
		t.Fatalf(".part files left behind: %v", parts)
	}
	if !strings.Contains(strings.Join(said, "\n"), "server error 500") {
		t.Errorf("no word of the 500s: %v", said)
	}
}
