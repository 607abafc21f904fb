package pull

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/kiln-fhir/kiln/fhirparquet"
)

// Kind says which list of the manifest a file came from.
type Kind string

const (
	KindOutput  Kind = "output"
	KindDeleted Kind = "deleted"
	KindError   Kind = "error"
)

// Step names a point of a pull where a crash leaves a distinct state on
// disk; Options.Failpoint is called at each.
type Step string

const (
	StepKickedOff  Step = "kicked-off" // the state file names the server's export
	StepPoll       Step = "poll"       // before each status request
	StepFileBody   Step = "file-body"  // part of a file's body is on disk
	StepFileDone   Step = "file-done"  // a file is verified in the staging folder
	StepVerified   Step = "verified"   // every file is verified; nothing committed yet
	StepApplied    Step = "applied"    // an earlier file was rewritten for the increment
	StepMoved      Step = "moved"      // a staged file was moved into the folder
	StepManifested Step = "manifested" // manifest.json is the new run's; the state is not yet completed
)

func (c *Client) failpoint(s Step) {
	if c.opt.Failpoint != nil {
		c.opt.Failpoint(s)
	}
}

// Issue is one issue of an OperationOutcome in an export's error files.
type Issue struct {
	File        string `json:"file"`
	Severity    string `json:"severity"`
	Code        string `json:"code"`
	Diagnostics string `json:"diagnostics,omitempty"`
	Expression  string `json:"expression,omitempty"`
}

// Failed reports whether the issue says some output is missing
// (severity error or fatal; warnings and information are not failures).
func (is Issue) Failed() bool { return is.Severity == "error" || is.Severity == "fatal" }

func (is Issue) String() string {
	s := fmt.Sprintf("%s %s: %s", is.Severity, is.Code, is.Diagnostics)
	if is.Expression != "" {
		s += " (at " + is.Expression + ")"
	}
	return s
}

// PartialError is returned for an export whose error files report failures
// when Options.AllowPartial is not set: its files are verified and kept in
// the staging folder, but nothing is committed.
type PartialError struct{ Failed int }

func (e *PartialError) Error() string {
	return fmt.Sprintf("the server reports %d failed outputs (error or fatal issues in its error files); nothing committed", e.Failed)
}

// checked is what verification learnt of one file.
type checked struct {
	name   string
	kind   Kind
	typ    string
	lines  int64
	bytes  int64
	sha256 string
	// keys are "Type/id" of the resources of an output file, or of the
	// deletions of a deleted file.
	keys   []string
	issues []Issue
}

func (f checked) local(mod time.Time) LocalFile {
	return LocalFile{File: f.name, Kind: f.kind, Type: f.typ, Lines: f.lines, Bytes: f.bytes, SHA256: f.sha256, Modified: mod}
}

// Download fetches every file of the manifest into the staging folder in
// parallel (keeping files an interrupted run already verified), verifies
// each and the export as a whole (no resource twice), then commits the run
// to the folder (see commit). On any error nothing of the run is committed
// and --resume continues it.
func (c *Client) Download(ctx context.Context, st *State, m *Manifest) (*Result, error) {
	if done, err := c.committed(st); err != nil || done {
		// A crash after the commit point: the folder is already the run's.
		if err == nil {
			st.Completed = true
			if err = c.save(st); err == nil {
				err = os.RemoveAll(c.staging())
			}
		}
		return &Result{Manifest: m}, err
	}
	if err := os.MkdirAll(c.staging(), 0o700); err != nil {
		return nil, err
	}
	type job struct {
		f    File
		kind Kind
		name string
	}
	var jobs []job
	seq := map[string]int{}
	add := func(files []File, kind Kind) {
		for _, f := range files {
			key := string(kind) + "/" + f.Type
			seq[key]++
			ext := "ndjson"
			if st.Request.Format == FormatParquet {
				ext = "parquet"
			}
			name := fmt.Sprintf("%s.%s.%03d.%s", f.Type, st.RunID, seq[key], ext)
			if kind != KindOutput {
				name = fmt.Sprintf("%s.%s.%03d.ndjson", kind, st.RunID, seq[key])
			}
			jobs = append(jobs, job{f: f, kind: kind, name: name})
		}
	}
	add(m.Output, KindOutput)
	add(m.Deleted, KindDeleted)
	add(m.Error, KindError)
	res := &Result{Manifest: m}
	var (
		mu       sync.Mutex
		firstErr error
		files    []checked
		seen     = newKeySet()
	)
	work := make(chan job)
	var wg sync.WaitGroup
	for range c.opt.Parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range work {
				f, err := c.fetch(ctx, st, m, j.f, j.kind, j.name)
				mu.Lock()
				if err == nil && j.kind == KindOutput {
					err = seen.add(f)
				}
				if err != nil {
					if firstErr == nil {
						firstErr = fmt.Errorf("%s: %w", j.name, err)
					}
					mu.Unlock()
					continue // a failed file is not counted as downloaded
				}
				files = append(files, f)
				res.Files++
				res.Bytes += f.bytes
				switch j.kind {
				case KindOutput:
					res.Resources += f.lines
				case KindDeleted:
					res.Deleted += int(f.lines)
				case KindError:
					res.Errors += int(f.lines)
					res.Issues = append(res.Issues, f.issues...)
				}
				c.say("downloaded %d/%d files, %.1f MB", res.Files, len(jobs), float64(res.Bytes)/1e6)
				mu.Unlock()
				c.failpoint(StepFileDone)
			}
		}()
	}
	for _, j := range jobs {
		select {
		case work <- j:
		case <-ctx.Done():
		}
	}
	close(work)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if firstErr != nil {
		return res, firstErr
	}
	// Every file is verified: the server's manifest is kept with them, so
	// that a resume from here on needs nothing more from the server (its
	// export may have expired by then).
	if err := c.stageManifest(st, m); err != nil {
		return res, err
	}
	c.failpoint(StepVerified)
	failed := 0
	for _, is := range res.Issues {
		if is.Failed() {
			failed++
		}
	}
	if failed > 0 && !c.opt.AllowPartial {
		return res, &PartialError{Failed: failed}
	}
	if err := c.commit(st, m, files, res); err != nil {
		return res, fmt.Errorf("commit: %w", err)
	}
	return res, nil
}

// fetch downloads one file into the staging folder (unless a verified copy
// exists there, or in the folder from a commit a crash cut short),
// retrying transient failures and truncated bodies, and verifies it.
func (c *Client) fetch(ctx context.Context, st *State, m *Manifest, f File, kind Kind, name string) (checked, error) {
	path := filepath.Join(c.staging(), name)
	for _, p := range []string{path, filepath.Join(c.opt.Out, name)} {
		if got, err := verify(p, f, kind); err == nil {
			return got, nil // done by an earlier, interrupted run
		}
	}
	tmp := path + ".part"
	defer os.Remove(tmp) // never left behind, whatever happens
	var lastErr error
	for attempt := 0; attempt <= c.opt.MaxRetries; attempt++ {
		if attempt > 0 {
			if err := c.opt.Sleep(ctx, jitter(time.Duration(attempt)*500*time.Millisecond)); err != nil {
				return checked{}, err
			}
		}
		var tokenFor []string
		if m.RequiresAccessToken {
			tokenFor = st.origins()
		}
		res, err := c.do(ctx, http.MethodGet, f.URL, nil, tokenFor, func(r *http.Request) { r.Header.Set("Accept", "application/fhir+ndjson") })
		if err != nil {
			lastErr = err
			continue
		}
		if res.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
			res.Body.Close()
			lastErr = errors.New(describeBody(res.StatusCode, b))
			if res.StatusCode == http.StatusTooManyRequests || res.StatusCode == http.StatusServiceUnavailable {
				// "Not now": wait as the server says, then ask again.
				if wait, ok := retryAfter(res.Header.Get("Retry-After")); ok {
					c.say("%s: %d; retrying in %s", name, res.StatusCode, min(wait, c.opt.MaxWait))
					if err := c.opt.Sleep(ctx, min(wait, c.opt.MaxWait)); err != nil {
						return checked{}, err
					}
				}
				continue
			}
			if res.StatusCode < 500 {
				return checked{}, lastErr
			}
			continue
		}
		err = c.save1(tmp, res.Body)
		res.Body.Close()
		if err != nil {
			lastErr = fmt.Errorf("download broke off: %w", err)
			continue
		}
		got, err := verify(tmp, f, kind)
		if err != nil {
			lastErr = err
			continue
		}
		if err := os.Rename(tmp, path); err != nil {
			return checked{}, err
		}
		return got, nil
	}
	return checked{}, fmt.Errorf("gave up after %d attempts: %w", c.opt.MaxRetries+1, lastErr)
}

// save1 writes a response body to path and syncs it to disk; a body cut
// short (io.ErrUnexpectedEOF from the transport) is an error.
func (c *Client) save1(path string, body io.Reader) error {
	out, err := createPrivate(path)
	if err != nil {
		return err
	}
	defer out.Close()
	w := &bodyWriter{w: out, fire: func() { c.failpoint(StepFileBody) }}
	if _, err := io.Copy(w, body); err != nil {
		return err
	}
	if err := out.Sync(); err != nil {
		return err
	}
	return out.Close()
}

// bodyWriter calls fire once the first 64 KiB of a body are written: the
// point where a crash leaves a part file behind.
type bodyWriter struct {
	w     io.Writer
	n     int64
	fired bool
	fire  func()
}

func (b *bodyWriter) Write(p []byte) (int, error) {
	n, err := b.w.Write(p)
	b.n += int64(n)
	if !b.fired && b.n >= 64<<10 {
		b.fired = true
		b.fire()
	}
	return n, err
}

// verify checks a file: every line parses, has the manifest's
// resourceType, and the line count equals the manifest's count; it hashes
// the file and collects its resources' keys (and an error file's issues).
func verify(path string, f File, kind Kind) (checked, error) {
	fh, err := os.Open(path)
	if err != nil {
		return checked{}, err
	}
	defer fh.Close()
	got := checked{name: filepath.Base(path), kind: kind, typ: f.Type}
	if strings.HasSuffix(got.name, ".part") {
		got.name = strings.TrimSuffix(got.name, ".part")
	}
	want := f.Type
	if kind == KindDeleted && want == "" {
		want = "Bundle"
	}
	if strings.HasSuffix(got.name, ".parquet") {
		return verifyParquet(fh, got, f, want)
	}
	h := sha256.New()
	cr := &countingReader{r: io.TeeReader(fh, h)}
	sc := bufio.NewScanner(cr)
	sc.Buffer(make([]byte, 1<<20), 256<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		got.lines++
		var r struct {
			ResourceType string `json:"resourceType"`
			ID           string `json:"id"`
			Entry        []struct {
				Request struct{ Method, URL string }
			}
			Issue []struct {
				Severity, Code, Diagnostics string
				Expression                  []string
			}
		}
		if err := json.Unmarshal(line, &r); err != nil {
			return checked{}, fmt.Errorf("line %d is not JSON (truncated file?): %v", got.lines, err)
		}
		if want != "" && r.ResourceType != want {
			return checked{}, fmt.Errorf("line %d is a %s in a %s file", got.lines, r.ResourceType, want)
		}
		switch kind {
		case KindOutput:
			if r.ID == "" {
				return checked{}, fmt.Errorf("line %d: a %s without an id", got.lines, r.ResourceType)
			}
			got.keys = append(got.keys, r.ResourceType+"/"+r.ID)
		case KindDeleted:
			for _, e := range r.Entry {
				if e.Request.Method == http.MethodDelete {
					got.keys = append(got.keys, strings.TrimPrefix(e.Request.URL, "/"))
				}
			}
		case KindError:
			for _, is := range r.Issue {
				got.issues = append(got.issues, Issue{File: got.name, Severity: is.Severity, Code: is.Code,
					Diagnostics: is.Diagnostics, Expression: strings.Join(is.Expression, ", ")})
			}
		}
	}
	if err := sc.Err(); err != nil {
		return checked{}, err
	}
	// An error file's count is informative: a wrong one must not fail the
	// pull (the lines are still read and shown).
	if f.Count != nil && int64(*f.Count) != got.lines && kind != KindError {
		return checked{}, fmt.Errorf("%d lines, the manifest says %d (truncated file?)", got.lines, *f.Count)
	}
	got.bytes, got.sha256 = cr.n, hex.EncodeToString(h.Sum(nil))
	return got, nil
}

// verifyParquet checks a Parquet resource file as verify does an NDJSON
// one: it is a whole Parquet file, every row has the manifest's
// resourceType and an id, and the row count is the manifest's count.
func verifyParquet(fh *os.File, got checked, f File, want string) (checked, error) {
	if got.kind != KindOutput {
		return checked{}, fmt.Errorf("a %s file in Parquet", got.kind)
	}
	fi, err := fh.Stat()
	if err != nil {
		return checked{}, err
	}
	rows, err := fhirparquet.ReadKeys(fh, fi.Size(), func(typ, id string) error {
		if want != "" && typ != want {
			return fmt.Errorf("row %d is a %s in a %s file", len(got.keys)+1, typ, want)
		}
		if id == "" {
			return fmt.Errorf("row %d: a %s without an id", len(got.keys)+1, typ)
		}
		got.keys = append(got.keys, typ+"/"+id)
		return nil
	})
	if err != nil {
		return checked{}, err
	}
	if f.Count != nil && int64(*f.Count) != rows {
		return checked{}, fmt.Errorf("%d rows, the manifest says %d", rows, *f.Count)
	}
	h := sha256.New()
	if _, err := fh.Seek(0, io.SeekStart); err != nil {
		return checked{}, err
	}
	n, err := io.Copy(h, fh)
	if err != nil {
		return checked{}, err
	}
	got.lines, got.bytes, got.sha256 = rows, n, hex.EncodeToString(h.Sum(nil))
	return got, nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// keySet finds a resource that an export holds twice. It keeps a 128-bit
// FNV-1a hash per resource (16 bytes and the map's overhead, about 40 bytes
// per resource, whatever the ids' length) and the file it came from.
type keySet struct {
	files []string
	seen  map[[16]byte]int
}

func newKeySet() *keySet { return &keySet{seen: map[[16]byte]int{}} }

func (s *keySet) add(f checked) error {
	s.files = append(s.files, f.name)
	idx := len(s.files) - 1
	for _, k := range f.keys {
		h := fnv.New128a()
		io.WriteString(h, k)
		var sum [16]byte
		h.Sum(sum[:0])
		if prev, dup := s.seen[sum]; dup {
			where := "twice in " + f.name
			if prev != idx {
				where = "in " + s.files[prev] + " and in " + f.name
			}
			return fmt.Errorf("%s is exported %s: the export holds a resource twice", k, where)
		}
		s.seen[sum] = idx
	}
	return nil
}
