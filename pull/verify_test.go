package pull_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln/pull"
)

// fakeExport is a Bulk Data server with one export: status answers with
// the manifest (%[1]s in it is the server's URL), and files answer from
// the handlers by path.
type fakeExport struct {
	srv   *httptest.Server
	mu    sync.Mutex
	waits []time.Duration
}

// status, when set, may answer a poll itself (returning true).
func newFakeExport(t *testing.T, status func(http.ResponseWriter, *http.Request) bool, manifest string, files map[string]http.HandlerFunc) *fakeExport {
	f := &fakeExport{}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/$export":
			w.Header().Set("Content-Location", f.srv.URL+"/status")
			w.WriteHeader(http.StatusAccepted)
		case r.URL.Path == "/status":
			if status == nil || !status(w, r) {
				fmt.Fprintf(w, manifest, f.srv.URL)
			}
		case files[r.URL.Path] != nil:
			files[r.URL.Path](w, r)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeExport) client(dir string, edit func(*pull.Options)) *pull.Client {
	opt := pull.Options{Out: dir, MaxRetries: 3, Sleep: func(_ context.Context, d time.Duration) error {
		f.mu.Lock()
		f.waits = append(f.waits, d)
		f.mu.Unlock()
		return nil
	}}
	if edit != nil {
		edit(&opt)
	}
	return pull.New(opt)
}

func (f *fakeExport) pull(t *testing.T, c *pull.Client) (*pull.Result, error) {
	t.Helper()
	st, err := c.Start(context.Background(), pull.Request{Server: f.srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	return finish(t, c, st)
}

// finish polls a started (or resumed) pull to its manifest and downloads it.
func finish(t *testing.T, c *pull.Client, st *pull.State) (*pull.Result, error) {
	t.Helper()
	m, err := c.Wait(context.Background(), st)
	if err != nil {
		t.Fatal(err)
	}
	return c.Download(context.Background(), st, m)
}

func lines(s ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		for _, l := range s {
			fmt.Fprintln(w, l)
		}
	}
}

// TestDuplicateResourceFailsVerification: the same resource in two files
// (or twice in one) of an export is a verification failure, and nothing
// of the run is committed.
func TestDuplicateResourceFailsVerification(t *testing.T) {
	for name, files := range map[string][2][]string{
		"two files": {{`{"resourceType":"Patient","id":"a"}`}, {`{"resourceType":"Patient","id":"b"}`, `{"resourceType":"Patient","id":"a"}`}},
		"one file":  {{`{"resourceType":"Patient","id":"a"}`, `{"resourceType":"Patient","id":"a"}`}, {`{"resourceType":"Patient","id":"b"}`}},
	} {
		t.Run(name, func(t *testing.T) {
			f := newFakeExport(t, nil, `{"transactionTime":"2026-01-01T00:00:00Z","request":"x","output":[
				{"type":"Patient","url":"%[1]s/1"},{"type":"Patient","url":"%[1]s/2"}],"error":[]}`,
				map[string]http.HandlerFunc{"/1": lines(files[0]...), "/2": lines(files[1]...)})
			dir := t.TempDir()
			_, err := f.pull(t, f.client(dir, func(o *pull.Options) { o.Parallel = 1 }))
			if err == nil || !strings.Contains(err.Error(), "Patient/a is exported") {
				t.Fatalf("a duplicate resource: %v", err)
			}
			if _, err := os.Stat(filepath.Join(dir, "manifest.json")); err == nil {
				t.Fatal("a run with a duplicate was committed")
			}
		})
	}
}

// TestVerifyFolderFindsTampering: manifest.json records a SHA-256 and line
// count per file; VerifyFolder passes the committed folder and finds a file
// changed with the same line count, a file added, a file removed, and a
// resource copied into a second file.
func TestVerifyFolderFindsTampering(t *testing.T) {
	f := newFakeExport(t, nil, `{"transactionTime":"2026-01-01T00:00:00Z","request":"x","output":[
		{"type":"Patient","url":"%[1]s/p","count":2},{"type":"Condition","url":"%[1]s/c","count":1}],"error":[]}`,
		map[string]http.HandlerFunc{
			"/p": lines(`{"resourceType":"Patient","id":"a","gender":"male"}`, `{"resourceType":"Patient","id":"b"}`),
			"/c": lines(`{"resourceType":"Condition","id":"c1"}`),
		})
	dir := t.TempDir()
	if _, err := f.pull(t, f.client(dir, nil)); err != nil {
		t.Fatal(err)
	}
	files, resources, problems, err := pull.VerifyFolder(dir)
	if err != nil || len(problems) != 0 || files != 2 || resources != 3 {
		t.Fatalf("the committed folder: %d files, %d resources, %v, %v", files, resources, problems, err)
	}
	pat, _ := filepath.Glob(filepath.Join(dir, "Patient.*.ndjson"))
	cond, _ := filepath.Glob(filepath.Join(dir, "Condition.*.ndjson"))
	if len(pat) != 1 || len(cond) != 1 {
		t.Fatalf("files %v %v", pat, cond)
	}
	b, _ := os.ReadFile(pat[0])
	check := func(what, want string) {
		t.Helper()
		_, _, problems, err := pull.VerifyFolder(dir)
		if err != nil || !strings.Contains(strings.Join(problems, "\n"), want) {
			t.Errorf("%s: problems %v (%v), want one saying %q", what, problems, err, want)
		}
	}
	os.WriteFile(pat[0], []byte(strings.Replace(string(b), "male", "mile", 1)), 0o644)
	check("same lines, other content", "SHA-256")
	os.WriteFile(pat[0], b, 0o644)
	os.WriteFile(filepath.Join(dir, "Patient.extra.001.ndjson"), []byte(`{"resourceType":"Patient","id":"z"}`+"\n"), 0o644)
	check("an unlisted file", "not in manifest.json")
	os.Remove(filepath.Join(dir, "Patient.extra.001.ndjson"))
	c, _ := os.ReadFile(cond[0])
	os.Remove(cond[0])
	check("a file removed", filepath.Base(cond[0]))
	os.WriteFile(cond[0], c, 0o644)
	if _, _, problems, _ := pull.VerifyFolder(dir); len(problems) != 0 {
		t.Fatalf("restored folder: %v", problems)
	}
}

// TestFailedOutputsNeedAllowPartial: an export whose error file reports an
// error is not committed (the issues are returned for the caller to show);
// resumed with AllowPartial it is, and its error file is kept and listed.
func TestFailedOutputsNeedAllowPartial(t *testing.T) {
	f := newFakeExport(t, nil, `{"transactionTime":"2026-01-01T00:00:00Z","request":"x","output":[
		{"type":"Patient","url":"%[1]s/p","count":1}],"error":[{"type":"OperationOutcome","url":"%[1]s/e"}]}`,
		map[string]http.HandlerFunc{
			"/p": lines(`{"resourceType":"Patient","id":"a"}`),
			"/e": lines(`{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"Observation export failed","expression":["Observation"]}]}`,
				`{"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"processing","diagnostics":"ignored: _elements"}]}`),
		})
	dir := t.TempDir()
	res, err := f.pull(t, f.client(dir, nil))
	var partial *pull.PartialError
	if !errors.As(err, &partial) || partial.Failed != 1 {
		t.Fatalf("an export with a failed output: %v", err)
	}
	if len(res.Issues) != 2 || !res.Issues[0].Failed() || res.Issues[1].Failed() || !strings.Contains(res.Issues[0].String(), "Observation export failed") {
		t.Fatalf("issues: %+v", res.Issues)
	}
	if _, err := os.Stat(filepath.Join(dir, "manifest.json")); err == nil {
		t.Fatal("a partial export was committed without AllowPartial")
	}
	if !pull.Unfinished(dir) {
		t.Fatal("the partial run is not left for --resume")
	}
	c := f.client(dir, func(o *pull.Options) { o.AllowPartial = true })
	st, err := c.Resume()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := finish(t, c, st); err != nil {
		t.Fatalf("with AllowPartial: %v", err)
	}
	files, _, problems, err := pull.VerifyFolder(dir)
	if err != nil || len(problems) != 0 || files != 2 {
		t.Fatalf("committed partial export: %d files, %v, %v", files, problems, err)
	}
	if e, _ := filepath.Glob(filepath.Join(dir, "error.*.ndjson")); len(e) != 1 {
		t.Fatalf("error file not kept: %v", e)
	}
}

// TestFileDownloadsAndStatusHonourRetryAfter: a 503 and a 429 on a file and
// a 503 on the status are waited out as their Retry-After says (seconds or
// an HTTP date), not by the client's own backoff.
func TestFileDownloadsAndStatusHonourRetryAfter(t *testing.T) {
	var mu sync.Mutex
	gets, polls := 0, 0
	date := time.Now().Add(40 * time.Second).UTC().Format(http.TimeFormat)
	f := newFakeExport(t, func(w http.ResponseWriter, r *http.Request) bool {
		mu.Lock()
		defer mu.Unlock()
		if polls++; polls == 1 {
			w.Header().Set("Retry-After", "11")
			w.WriteHeader(http.StatusServiceUnavailable)
			return true
		}
		return false
	}, `{"transactionTime":"2026-01-01T00:00:00Z","request":"x","output":[{"type":"Patient","url":"%[1]s/p","count":1}],"error":[]}`,
		map[string]http.HandlerFunc{"/p": func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			defer mu.Unlock()
			switch gets++; gets {
			case 1:
				w.Header().Set("Retry-After", "9")
				w.WriteHeader(http.StatusServiceUnavailable)
			case 2:
				w.Header().Set("Retry-After", date)
				w.WriteHeader(http.StatusTooManyRequests)
			default:
				fmt.Fprintln(w, `{"resourceType":"Patient","id":"a"}`)
			}
		}})
	if _, err := f.pull(t, f.client(t.TempDir(), nil)); err != nil {
		t.Fatal(err)
	}
	var honoured []time.Duration
	for _, d := range f.waits {
		if d >= 5*time.Second {
			honoured = append(honoured, d)
		}
	}
	if len(honoured) != 3 || honoured[0] != 11*time.Second || honoured[1] != 9*time.Second || honoured[2] < 30*time.Second || honoured[2] > 41*time.Second {
		t.Fatalf("waits %v: want 11s (status), 9s and about 40s (file)", f.waits)
	}
}

// TestTokenGoesOnlyToTheServer (issue 17): with requiresAccessToken, the
// bearer token goes to the server's own origin — kick-off, status, its
// files — and never to a file URL on another host (a presigned URL, or a
// server pointing the client elsewhere).
func TestTokenGoesOnlyToTheServer(t *testing.T) {
	var mu sync.Mutex
	sawToken := map[string]bool{}
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		sawToken["other"] = sawToken["other"] || r.Header.Get("Authorization") != ""
		mu.Unlock()
		fmt.Fprintln(w, `{"resourceType":"Condition","id":"c"}`)
	}))
	defer other.Close()
	var f *fakeExport
	f = newFakeExport(t, func(w http.ResponseWriter, r *http.Request) bool {
		mu.Lock()
		sawToken["status"] = r.Header.Get("Authorization") == "Bearer s3cret"
		mu.Unlock()
		return false
	}, `{"transactionTime":"2026-01-01T00:00:00Z","request":"x","requiresAccessToken":true,"output":[
		{"type":"Patient","url":"%[1]s/p"},{"type":"Condition","url":"`+other.URL+`/c?X-Amz-Signature=abc"}],"error":[]}`,
		map[string]http.HandlerFunc{"/p": func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			sawToken["own file"] = r.Header.Get("Authorization") == "Bearer s3cret"
			mu.Unlock()
			fmt.Fprintln(w, `{"resourceType":"Patient","id":"a"}`)
		}})
	// Started as localhost: the server answers with its 127.0.0.1 name,
	// which is its own origin too (it said so in Content-Location).
	c := f.client(t.TempDir(), func(o *pull.Options) { o.Tokens = pull.StaticToken("s3cret") })
	st, err := c.Start(context.Background(), pull.Request{Server: strings.Replace(f.srv.URL, "127.0.0.1", "localhost", 1)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := finish(t, c, st); err != nil {
		t.Fatal(err)
	}
	if !sawToken["status"] || !sawToken["own file"] {
		t.Errorf("the server itself did not get the token: %v", sawToken)
	}
	if sawToken["other"] {
		t.Error("the token was sent to a file URL on another host")
	}
}

// TestResumeNeedsNoServerOnceVerified: a pull killed after every file was
// verified — here while it moves them into the folder — is finished by a
// resume even when the server's export is gone.
func TestResumeNeedsNoServerOnceVerified(t *testing.T) {
	f := newFakeExport(t, nil, `{"transactionTime":"2026-01-01T00:00:00Z","request":"x","output":[
		{"type":"Patient","url":"%[1]s/p","count":2},{"type":"Condition","url":"%[1]s/c","count":1}],"error":[]}`,
		map[string]http.HandlerFunc{
			"/p": lines(`{"resourceType":"Patient","id":"a"}`, `{"resourceType":"Patient","id":"b"}`),
			"/c": lines(`{"resourceType":"Condition","id":"c1"}`),
		})
	dir := t.TempDir()
	type crash struct{}
	c := f.client(dir, func(o *pull.Options) {
		o.Failpoint = func(s pull.Step) {
			if s == pull.StepMoved {
				panic(crash{})
			}
		}
	})
	func() {
		defer func() {
			if _, ok := recover().(crash); !ok {
				t.Fatal("the pull did not reach the move")
			}
		}()
		f.pull(t, c)
	}()
	f.srv.Close() // the export is gone
	c2 := f.client(dir, nil)
	st, err := c2.Resume()
	if err != nil {
		t.Fatal(err)
	}
	m, ok := c2.StagedManifest(st)
	if !ok {
		t.Fatal("no staged manifest after every file was verified")
	}
	if _, err := c2.Download(context.Background(), st, m); err != nil {
		t.Fatalf("resume without the server: %v", err)
	}
	if files, res, problems, err := pull.VerifyFolder(dir); err != nil || len(problems) > 0 || files != 2 || res != 3 {
		t.Fatalf("after the resume: %d files, %d resources, %v %v", files, res, problems, err)
	}
}

// TestBodyCutShortIsNotAccepted: a file whose body ends before its
// Content-Length — on a line boundary, with no count in the manifest — is
// a broken download, fetched again, not a verified file.
func TestBodyCutShortIsNotAccepted(t *testing.T) {
	var mu sync.Mutex
	gets := 0
	f := newFakeExport(t, nil, `{"transactionTime":"2026-01-01T00:00:00Z","request":"x","output":[{"type":"Patient","url":"%[1]s/p"}],"error":[]}`,
		map[string]http.HandlerFunc{"/p": func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			gets++
			first := gets == 1
			mu.Unlock()
			full := `{"resourceType":"Patient","id":"a"}` + "\n" + `{"resourceType":"Patient","id":"b"}` + "\n"
			if first {
				w.Header().Set("Content-Length", fmt.Sprint(len(full)))
				io.WriteString(w, full[:strings.Index(full, "\n")+1]) // one whole line, then the connection ends
				return
			}
			io.WriteString(w, full)
		}})
	dir := t.TempDir()
	if _, err := f.pull(t, f.client(dir, nil)); err != nil {
		t.Fatal(err)
	}
	if gets < 2 {
		t.Fatal("the body cut short was accepted")
	}
	if _, res, problems, _ := pull.VerifyFolder(dir); res != 2 || len(problems) > 0 {
		t.Fatalf("after the retry: %d resources, %v", res, problems)
	}
}
