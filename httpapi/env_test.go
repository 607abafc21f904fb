package httpapi_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/httpapi"
	"github.com/kiln-fhir/kiln/ingest"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/postgres"
	"github.com/kiln-fhir/kiln/sqlite"
	"github.com/kiln-fhir/kiln/storetest"
)

// dataDir is the shared Synthea data, beside the repository.
func dataDir(t testing.TB, set string) string {
	t.Helper()
	for _, p := range []string{"../../shared/data", "../shared/data"} {
		d := filepath.Join(p, set)
		if _, err := os.Stat(d); err == nil {
			return d
		}
	}
	t.Fatalf("test data %s not found beside the repository (../shared/data)", set)
	return ""
}

type envOpts struct {
	// configure, if set, adjusts the HTTP configuration once the base URL is known.
	configure  func(e *env, hc *httpapi.Config, ec *export.Config)
	dir        string
	noWorkers  bool
	exportCfg  export.Config
	httpCfg    httpapi.Config
	keepServer bool
	// basePath is the FHIR base path served (default /4_0_0; "/" is the root).
	basePath string
	// tenancy is the --tenancy of an authenticated env (newAuthEnv); empty
	// there means kiln.TenancyAccessTags, the multi-tenant contract most
	// security tests are about.
	tenancy kiln.Tenancy
}

// testStore is the store under test: SQLite, or PostgreSQL when
// KILN_TEST_STORE=postgres (scripts/test runs this package both ways).
type testStore interface {
	storetest.Store
	Close() error
}

// openStore opens the store named key: a folder for SQLite, a schema for
// PostgreSQL. Opening the same key again reopens the same data.
func openStore(t testing.TB, key string) testStore {
	t.Helper()
	if os.Getenv("KILN_TEST_STORE") != "postgres" {
		db, err := sqlite.Open(context.Background(), key)
		if err != nil {
			t.Fatal(err)
		}
		return db
	}
	url := os.Getenv("KILN_POSTGRES_URL")
	if url == "" {
		t.Fatal("KILN_TEST_STORE=postgres needs KILN_POSTGRES_URL")
	}
	schema := "t" + strings.ReplaceAll(strings.ToLower(filepath.Base(filepath.Dir(key))+filepath.Base(key)), "-", "")
	schema = strings.Map(func(r rune) rune {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') || r == '_' {
			return r
		}
		return '_'
	}, schema)
	db, err := postgres.Open(context.Background(), url, postgres.Options{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { postgres.DropSchema(context.Background(), url, schema) })
	return db
}

type env struct {
	t       testing.TB
	dir     string
	db      testStore
	svc     *export.Service
	srv     *httptest.Server
	base    string
	root    string // scheme://host:port, without the base path
	stop    context.CancelFunc
	running sync.WaitGroup
	started bool
}

func newEnv(t testing.TB, o envOpts) *env {
	t.Helper()
	if o.dir == "" {
		o.dir = t.TempDir()
	}
	e := &env{t: t, dir: o.dir}
	e.db = openStore(t, o.dir)
	sink, err := localfs.New(filepath.Join(o.dir, "exports"))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	e.srv = httptest.NewUnstartedServer(nil)
	e.root = "http://" + e.srv.Listener.Addr().String()
	if o.basePath == "" {
		o.basePath = "/4_0_0"
	}
	e.base = e.root + httpapi.CleanBasePath(o.basePath)
	cfg := o.exportCfg
	cfg.Logger = log
	if cfg.Workers == 0 {
		cfg.Workers = 2
	}
	cfg.Ref = fhir.Options{Bases: []string{e.base}}
	hc := o.httpCfg
	hc.Logger = log
	hc.BasePath = o.basePath
	if hc.PollBurst == 0 {
		hc.PollBurst = -1
	}
	if hc.RetryAfter == 0 {
		hc.RetryAfter = 1
	}
	if hc.KickOffsPerMinute == 0 {
		hc.KickOffsPerMinute = -1
	}
	if o.configure != nil {
		o.configure(e, &hc, &cfg)
	}
	e.svc = export.New(e.db, e.db, sink, cfg)
	e.srv.Config.Handler = httpapi.New(e.db, e.svc, hc, nil)
	e.srv.Start()
	if !o.noWorkers {
		e.startWorkers()
	}
	t.Cleanup(e.close)
	return e
}

func (e *env) startWorkers() {
	ctx, cancel := context.WithCancel(context.Background())
	e.stop = cancel
	e.started = true
	e.running.Add(1)
	go func() {
		defer e.running.Done()
		if err := e.svc.Run(ctx); err != nil {
			e.t.Errorf("export workers: %v", err)
		}
	}()
}

func (e *env) stopWorkers() {
	if e.started {
		e.stop()
		e.running.Wait()
		e.started = false
	}
}

func (e *env) close() {
	e.srv.Close()
	e.stopWorkers()
	e.db.Close()
}

func (e *env) load(paths ...string) ingest.Stats {
	e.t.Helper()
	st, err := ingest.Load(context.Background(), e.db, paths, ingest.LoadOptions{NewID: uuid.NewString})
	if err != nil {
		e.t.Fatal(err)
	}
	if st.RejectedCount > 0 {
		e.t.Fatalf("load rejected %d: %+v", st.RejectedCount, st.Rejected)
	}
	return st
}

type response struct {
	*http.Response
	body []byte
}

func (r response) json(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.body, &m); err != nil {
		t.Fatalf("%d response is not JSON: %v: %s", r.StatusCode, err, r.body)
	}
	return m
}

// outcomeText joins the diagnostics and expressions of an OperationOutcome.
func (r response) outcomeText(t testing.TB) string {
	t.Helper()
	m := r.json(t)
	if m["resourceType"] != "OperationOutcome" {
		t.Fatalf("%d response is not an OperationOutcome: %s", r.StatusCode, r.body)
	}
	var b strings.Builder
	for _, is := range m["issue"].([]any) {
		im := is.(map[string]any)
		b.WriteString(im["diagnostics"].(string))
		if ex, ok := im["expression"].([]any); ok {
			for _, x := range ex {
				b.WriteString(" @" + x.(string))
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

func (e *env) do(method, url string, body []byte, headers ...string) response {
	e.t.Helper()
	if !strings.HasPrefix(url, "http") {
		url = e.base + url
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return response{Response: res, body: b}
}

// kickOff starts an export and returns its status URL.
func (e *env) kickOff(method, path string, body []byte, headers ...string) string {
	e.t.Helper()
	r := e.do(method, path, body, append([]string{"Accept", "application/fhir+json", "Prefer", "respond-async"}, headers...)...)
	if r.StatusCode != http.StatusAccepted {
		e.t.Fatalf("%s %s: %d %s", method, path, r.StatusCode, r.body)
	}
	loc := r.Header.Get("Content-Location")
	if !strings.HasPrefix(loc, "http://") {
		e.t.Fatalf("Content-Location %q is not absolute", loc)
	}
	return loc
}

type manifest struct {
	TransactionTime     string `json:"transactionTime"`
	Request             string `json:"request"`
	RequiresAccessToken bool   `json:"requiresAccessToken"`
	OutputOrganizedBy   string `json:"outputOrganizedBy"`
	Output              []item `json:"output"`
	Deleted             []item `json:"deleted"`
	Error               []item `json:"error"`
	Errors              []item `json:"errors"`
	Link                []struct{ Relation, URL string }
}

type item struct {
	Type            string `json:"type"`
	URL             string `json:"url"`
	Count           int    `json:"count"`
	ContinuesInFile string `json:"continuesInFile"`
}

// wait polls a status URL until the export finishes; 202s must carry
// Retry-After and X-Progress.
func (e *env) wait(loc string) (response, manifest) {
	e.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		r := e.do("GET", loc, nil, "Accept", "application/json")
		switch r.StatusCode {
		case http.StatusAccepted:
			if ra := r.Header.Get("Retry-After"); ra == "" || strings.Trim(ra, "0123456789") != "" {
				e.t.Fatalf("202 with Retry-After %q", ra)
			}
			if p := r.Header.Get("X-Progress"); !strings.HasPrefix(p, "accepted") && !strings.HasPrefix(p, "in-progress") {
				e.t.Fatalf("202 with X-Progress %q", p)
			}
			time.Sleep(20 * time.Millisecond)
			continue
		case http.StatusOK:
			var m manifest
			if err := json.Unmarshal(r.body, &m); err != nil {
				e.t.Fatalf("manifest: %v: %s", err, r.body)
			}
			return r, m
		default:
			return r, manifest{}
		}
	}
	e.t.Fatalf("export %s did not finish", loc)
	return response{}, manifest{}
}

func (e *env) mustComplete(loc string) manifest {
	e.t.Helper()
	r, m := e.wait(loc)
	if r.StatusCode != http.StatusOK {
		e.t.Fatalf("export ended with %d: %s", r.StatusCode, r.body)
	}
	return m
}

// lines downloads a file and returns its lines.
func (e *env) lines(url string, gz bool) [][]byte {
	e.t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Accept", "application/fhir+ndjson")
	if gz {
		req.Header.Set("Accept-Encoding", "gzip")
	}
	// A Transport that does not decompress by itself, so the test sees the encoding.
	client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	res, err := client.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != 200 {
		b, _ := io.ReadAll(res.Body)
		e.t.Fatalf("GET %s: %d %s", url, res.StatusCode, b)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/fhir+ndjson") {
		e.t.Fatalf("file Content-Type %q", ct)
	}
	if res.Header.Get("Expires") == "" {
		e.t.Fatal("file without Expires")
	}
	var rd io.Reader = res.Body
	if gz {
		if res.Header.Get("Content-Encoding") != "gzip" {
			e.t.Fatal("asked for gzip, got none")
		}
		zr, err := gzip.NewReader(res.Body)
		if err != nil {
			e.t.Fatal(err)
		}
		rd = zr
	}
	var out [][]byte
	sc := bufio.NewScanner(rd)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		out = append(out, append([]byte(nil), sc.Bytes()...))
	}
	if err := sc.Err(); err != nil {
		e.t.Fatal(err)
	}
	return out
}

// exported downloads every output file, checks each line as Inferno does,
// and returns the ids per type.
func (e *env) exported(m manifest) map[string][]string {
	ids, _ := e.exportedLines(m)
	return ids
}

// exportedLines is exported, also returning every downloaded line.
func (e *env) exportedLines(m manifest) (map[string][]string, [][]byte) {
	e.t.Helper()
	out := map[string][]string{}
	var all [][]byte
	for _, it := range m.Output {
		if it.Type == "" || !strings.HasPrefix(it.URL, "http://") {
			e.t.Fatalf("output item %+v", it)
		}
		lines := e.lines(it.URL, false)
		if len(lines) != it.Count {
			e.t.Fatalf("%s: %d lines, manifest count %d", it.URL, len(lines), it.Count)
		}
		for _, l := range lines {
			p, err := fhir.Parse(l)
			if err != nil {
				e.t.Fatalf("%s: line is not a valid R4 resource: %v: %s", it.URL, err, l)
			}
			if p.Type != it.Type {
				e.t.Fatalf("%s: line of type %s in a %s file", it.URL, p.Type, it.Type)
			}
			out[it.Type] = append(out[it.Type], p.ID)
			all = append(all, l)
		}
	}
	return out, all
}
