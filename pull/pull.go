// Package pull is a Bulk Data client: it kicks off an export on any
// conformant server, polls it honouring Retry-After, downloads the files in
// parallel with retries, verifies them, and can resume after an interruption
// or pull incrementally (applying deletions to the local copy).
package pull

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Request says what to export.
type Request struct {
	Server string // FHIR base URL
	// Level: "system", "patient" or "group" (with GroupID).
	Level       string
	GroupID     string
	Types       []string
	Since       string
	Until       string
	TypeFilters []string
	Elements    []string
	Patients    []string
	Lenient     bool
	// Post kicks off with POST and a Parameters body (implied by Patients).
	Post bool
	// IncludeAssociatedData values (includeAssociatedData).
	IncludeAssociatedData []string
}

// parametersBody is the FHIR Parameters resource for a POST kick-off,
// holding every parameter of req.
func parametersBody(req Request) []byte {
	params := []map[string]any{}
	add := func(name, key, v string) { params = append(params, map[string]any{"name": name, key: v}) }
	if len(req.Types) > 0 {
		add("_type", "valueString", strings.Join(req.Types, ","))
	}
	instant := func(v string) string {
		if strings.Contains(v, "T") {
			return "valueInstant"
		}
		return "valueDate"
	}
	if req.Since != "" {
		add("_since", instant(req.Since), req.Since)
	}
	if req.Until != "" {
		add("_until", instant(req.Until), req.Until)
	}
	if len(req.Elements) > 0 {
		add("_elements", "valueString", strings.Join(req.Elements, ","))
	}
	for _, f := range req.TypeFilters {
		add("_typeFilter", "valueString", f)
	}
	for _, v := range req.IncludeAssociatedData {
		add("includeAssociatedData", "valueCode", v)
	}
	for _, p := range req.Patients {
		if !strings.Contains(p, "/") {
			p = "Patient/" + p
		}
		params = append(params, map[string]any{"name": "patient", "valueReference": map[string]string{"reference": p}})
	}
	b, _ := json.Marshal(map[string]any{"resourceType": "Parameters", "parameter": params})
	return b
}

// Options tune a pull.
type Options struct {
	Out      string
	Parallel int
	Tokens   TokenSource
	HTTP     *http.Client
	// Progress receives human-readable status lines.
	Progress func(string)
	// MaxRetries bounds retries of one request (default 5); MaxWait caps one wait (default 60 s).
	MaxRetries int
	MaxWait    time.Duration
	// Sleep waits between attempts (tests inject one; default a timer that honours ctx).
	Sleep func(ctx context.Context, d time.Duration) error
}

// State is what a pull remembers in its folder, so that it can resume.
type State struct {
	Request     Request   `json:"request"`
	StatusURL   string    `json:"statusUrl"`
	Started     time.Time `json:"started"`
	RunID       string    `json:"runId"`
	Completed   bool      `json:"completed"`
	PreviousRun string    `json:"previousRun,omitempty"`
	// Incremental marks a --since-last run: its increment is applied to the
	// earlier runs' files before its manifest becomes the folder's watermark,
	// also when the run is finished by --resume.
	Incremental bool `json:"incremental,omitempty"`
}

// pendingManifest holds the server's manifest until every file is verified
// (and an increment applied): manifest.json, whose transactionTime is the
// --since-last watermark, must never come from an unfinished run.
const pendingManifest = ".kiln-pull-manifest.json"

// CommitManifest makes the run's manifest the folder's manifest.json.
func (c *Client) CommitManifest() error {
	return os.Rename(filepath.Join(c.opt.Out, pendingManifest), filepath.Join(c.opt.Out, "manifest.json"))
}

// Unfinished reports whether dir holds a pull that has not completed.
func Unfinished(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return false
	}
	var st State
	return json.Unmarshal(b, &st) == nil && !st.Completed
}

// Manifest is the completed export's manifest.
type Manifest struct {
	TransactionTime     string `json:"transactionTime"`
	Request             string `json:"request"`
	RequiresAccessToken bool   `json:"requiresAccessToken"`
	Output              []File `json:"output"`
	Deleted             []File `json:"deleted"`
	Error               []File `json:"error"`
}

// File is one manifest entry.
type File struct {
	Type  string `json:"type"`
	URL   string `json:"url"`
	Count *int   `json:"count,omitempty"`
}

// Result summarises a pull.
type Result struct {
	Manifest  *Manifest
	Files     int
	Resources int64
	Bytes     int64
	Deleted   int
	Errors    int
}

const stateFile = ".kiln-pull.json"

// Client runs pulls.
type Client struct {
	opt Options
}

// New returns a Client.
func New(opt Options) *Client {
	if opt.Parallel <= 0 {
		opt.Parallel = 4
	}
	if opt.HTTP == nil {
		opt.HTTP = &http.Client{Timeout: 0}
	}
	if opt.MaxRetries <= 0 {
		opt.MaxRetries = 5
	}
	if opt.MaxWait <= 0 {
		opt.MaxWait = 60 * time.Second
	}
	if opt.Sleep == nil {
		opt.Sleep = sleep
	}
	if opt.Progress == nil {
		opt.Progress = func(string) {}
	}
	return &Client{opt: opt}
}

func (c *Client) say(format string, args ...any) { c.opt.Progress(fmt.Sprintf(format, args...)) }

// Start kicks off an export and records its state in the output folder.
func (c *Client) Start(ctx context.Context, req Request) (*State, error) {
	if err := os.MkdirAll(c.opt.Out, 0o755); err != nil {
		return nil, err
	}
	path := "/$export"
	switch req.Level {
	case "patient":
		path = "/Patient/$export"
	case "group":
		path = "/Group/" + url.PathEscape(req.GroupID) + "/$export"
	}
	q := url.Values{}
	if len(req.Types) > 0 {
		q.Set("_type", strings.Join(req.Types, ","))
	}
	if req.Since != "" {
		q.Set("_since", req.Since)
	}
	if req.Until != "" {
		q.Set("_until", req.Until)
	}
	if len(req.Elements) > 0 {
		q.Set("_elements", strings.Join(req.Elements, ","))
	}
	for _, f := range req.TypeFilters {
		q.Add("_typeFilter", f)
	}
	method, body := http.MethodGet, []byte(nil)
	if len(req.Patients) > 0 || req.Post {
		// POST carries every parameter in the Parameters body (as the IG
		// asks); servers that read only the body would otherwise export everything.
		method = http.MethodPost
		body = parametersBody(req)
		q = url.Values{}
	}
	u := strings.TrimSuffix(req.Server, "/") + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	var res *http.Response
	for attempt := 0; ; attempt++ {
		var err error
		res, err = c.do(ctx, method, u, body, true, func(r *http.Request) {
			r.Header.Set("Accept", "application/fhir+json")
			prefer := "respond-async"
			if req.Lenient {
				prefer += ", handling=lenient"
			}
			r.Header.Set("Prefer", prefer)
			if body != nil {
				r.Header.Set("Content-Type", "application/fhir+json")
			}
		})
		if err != nil {
			return nil, fmt.Errorf("kick-off: %w", err)
		}
		// 429 and 503 mean "not now": wait as Retry-After says (bounded), then ask again.
		if (res.StatusCode != http.StatusTooManyRequests && res.StatusCode != http.StatusServiceUnavailable) || attempt >= c.opt.MaxRetries {
			break
		}
		wait, ok := retryAfter(res.Header.Get("Retry-After"))
		if !ok {
			wait = jitter(time.Duration(attempt+1) * time.Second)
		}
		res.Body.Close()
		c.say("kick-off: %d; retrying in %s", res.StatusCode, min(wait, c.opt.MaxWait))
		if err := c.opt.Sleep(ctx, min(wait, c.opt.MaxWait)); err != nil {
			return nil, err
		}
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusAccepted {
		return nil, fmt.Errorf("kick-off: %s", describe(res))
	}
	loc := res.Header.Get("Content-Location")
	if loc == "" {
		return nil, errors.New("kick-off: 202 without Content-Location")
	}
	now := time.Now().UTC()
	st := &State{Request: req, StatusURL: loc, Started: now, RunID: newRunID(c.opt.Out, now)}
	if err := c.save(st); err != nil {
		return nil, err
	}
	c.say("export started: %s", loc)
	return st, nil
}

// Resume reads the state of an earlier pull in the output folder.
func (c *Client) Resume() (*State, error) {
	b, err := os.ReadFile(filepath.Join(c.opt.Out, stateFile))
	if err != nil {
		return nil, fmt.Errorf("nothing to resume in %s: %w", c.opt.Out, err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", stateFile, err)
	}
	return &st, nil
}

// Save records st in the output folder.
func (c *Client) Save(st *State) error { return c.save(st) }

func (c *Client) save(st *State) error {
	b, _ := json.MarshalIndent(st, "", "  ")
	tmp := filepath.Join(c.opt.Out, stateFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(c.opt.Out, stateFile))
}

// Cancel asks the server to cancel (or forget) the export.
func (c *Client) Cancel(ctx context.Context, st *State) error {
	res, err := c.do(ctx, http.MethodDelete, st.StatusURL, nil, true, nil)
	if err != nil {
		return err
	}
	res.Body.Close()
	if res.StatusCode != http.StatusAccepted && res.StatusCode != http.StatusNotFound {
		return fmt.Errorf("cancel: %s", describe(res))
	}
	c.say("export cancelled on the server")
	return nil
}

// Wait polls until the export completes, honouring Retry-After and backing
// off when it is missing; transient failures (5xx, 429, network) are retried.
func (c *Client) Wait(ctx context.Context, st *State) (*Manifest, error) {
	backoff := time.Second
	fails := 0
	for {
		res, err := c.do(ctx, http.MethodGet, st.StatusURL, nil, true, func(r *http.Request) { r.Header.Set("Accept", "application/json") })
		if err != nil {
			return nil, err
		}
		body, _ := io.ReadAll(io.LimitReader(res.Body, 64<<20))
		res.Body.Close()
		switch {
		case res.StatusCode == http.StatusOK:
			var m Manifest
			if err := json.Unmarshal(body, &m); err != nil {
				return nil, fmt.Errorf("manifest is not JSON: %w", err)
			}
			if err := os.WriteFile(filepath.Join(c.opt.Out, pendingManifest), body, 0o644); err != nil {
				return nil, err
			}
			return &m, nil
		case res.StatusCode == http.StatusAccepted || res.StatusCode == http.StatusTooManyRequests:
			fails = 0
			wait, ok := retryAfter(res.Header.Get("Retry-After"))
			if !ok {
				wait, backoff = backoff, min(backoff*2, c.opt.MaxWait)
			}
			c.say("status: %s; next poll in %s", orDefault(res.Header.Get("X-Progress"), strconv.Itoa(res.StatusCode)), wait)
			if err := c.opt.Sleep(ctx, min(wait, c.opt.MaxWait)); err != nil {
				return nil, err
			}
		case res.StatusCode >= 500 && !isFailedExport(body):
			fails++
			if fails > c.opt.MaxRetries {
				return nil, fmt.Errorf("status: %d server errors in a row, last %s", fails, describeBody(res.StatusCode, body))
			}
			c.say("status: server error %d; retrying", res.StatusCode)
			if err := sleep(ctx, jitter(time.Duration(fails)*time.Second)); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("export failed: %s", describeBody(res.StatusCode, body))
		}
	}
}

// isFailedExport tells a failed job (an OperationOutcome with a non-transient
// code) from a passing server error.
func isFailedExport(body []byte) bool {
	var oo struct {
		ResourceType string
		Issue        []struct{ Code string }
	}
	if json.Unmarshal(body, &oo) != nil || oo.ResourceType != "OperationOutcome" {
		return false
	}
	for _, is := range oo.Issue {
		switch is.Code {
		case "transient", "throttled", "timeout", "lock-error", "no-store":
			return false
		}
	}
	return true
}

// Download fetches every file of the manifest into the output folder in
// parallel, skipping files an interrupted run already completed, and verifies them.
func (c *Client) Download(ctx context.Context, st *State, m *Manifest) (*Result, error) {
	type job struct {
		f    File
		kind string
		name string
	}
	var jobs []job
	seq := map[string]int{}
	add := func(files []File, kind string) {
		for _, f := range files {
			key := kind + "/" + f.Type
			seq[key]++
			name := fmt.Sprintf("%s.%s.%03d.ndjson", f.Type, st.RunID, seq[key])
			switch kind {
			case "deleted":
				name = fmt.Sprintf("deleted.%s.%03d.ndjson", st.RunID, seq[key])
			case "error":
				name = fmt.Sprintf("error.%s.%03d.ndjson", st.RunID, seq[key])
			}
			jobs = append(jobs, job{f: f, kind: kind, name: name})
		}
	}
	add(m.Output, "output")
	add(m.Deleted, "deleted")
	add(m.Error, "error")
	res := &Result{Manifest: m}
	var mu sync.Mutex
	var firstErr error
	work := make(chan job)
	var wg sync.WaitGroup
	for range c.opt.Parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range work {
				lines, size, err := c.fetch(ctx, m, j.f, j.kind, filepath.Join(c.opt.Out, j.name))
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = fmt.Errorf("%s: %w", j.name, err)
					}
					os.Remove(filepath.Join(c.opt.Out, j.name+".part"))
					mu.Unlock()
					continue // a failed file is not counted as downloaded
				}
				res.Files++
				res.Bytes += size
				switch j.kind {
				case "output":
					res.Resources += lines
				case "deleted":
					res.Deleted += int(lines)
				case "error":
					res.Errors += int(lines)
				}
				c.say("downloaded %d/%d files, %.1f MB", res.Files, len(jobs), float64(res.Bytes)/1e6)
				mu.Unlock()
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
	if !st.Incremental {
		if err := c.CommitManifest(); err != nil {
			return res, err
		}
	}
	st.Completed = true
	return res, c.save(st)
}

// fetch downloads one file (unless a verified copy exists), retrying
// transient failures and truncated bodies, and verifies it.
func (c *Client) fetch(ctx context.Context, m *Manifest, f File, kind, path string) (int64, int64, error) {
	if lines, size, err := verify(path, f, kind); err == nil {
		return lines, size, nil // done by an earlier, interrupted run
	}
	var lastErr error
	for attempt := 0; attempt <= c.opt.MaxRetries; attempt++ {
		if attempt > 0 {
			if err := sleep(ctx, jitter(time.Duration(attempt)*500*time.Millisecond)); err != nil {
				return 0, 0, err
			}
		}
		res, err := c.do(ctx, http.MethodGet, f.URL, nil, m.RequiresAccessToken, func(r *http.Request) { r.Header.Set("Accept", "application/fhir+ndjson") })
		if err != nil {
			lastErr = err
			continue
		}
		if res.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
			res.Body.Close()
			lastErr = errors.New(describeBody(res.StatusCode, b))
			if res.StatusCode < 500 && res.StatusCode != http.StatusTooManyRequests {
				return 0, 0, lastErr
			}
			continue
		}
		tmp := path + ".part"
		out, err := os.Create(tmp)
		if err != nil {
			res.Body.Close()
			return 0, 0, err
		}
		_, err = io.Copy(out, res.Body)
		res.Body.Close()
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			lastErr = fmt.Errorf("download broke off: %w", err)
			continue
		}
		lines, size, err := verify(tmp, f, kind)
		if err != nil {
			lastErr = err
			continue
		}
		if err := os.Rename(tmp, path); err != nil {
			return 0, 0, err
		}
		return lines, size, nil
	}
	return 0, 0, fmt.Errorf("gave up after %d attempts: %w", c.opt.MaxRetries+1, lastErr)
}

// verify checks a downloaded file: every line parses, has the manifest's
// resourceType, and the line count equals the manifest's count.
func verify(path string, f File, kind string) (int64, int64, error) {
	fh, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer fh.Close()
	want := f.Type
	if kind == "deleted" && want == "" {
		want = "Bundle"
	}
	sc := bufio.NewScanner(fh)
	sc.Buffer(make([]byte, 1<<20), 256<<20)
	var lines, size int64
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		size += int64(len(sc.Bytes())) + 1
		if len(line) == 0 {
			continue
		}
		lines++
		var r struct {
			ResourceType string `json:"resourceType"`
		}
		if err := json.Unmarshal(line, &r); err != nil {
			return 0, 0, fmt.Errorf("line %d is not JSON (truncated file?): %v", lines, err)
		}
		if want != "" && r.ResourceType != want {
			return 0, 0, fmt.Errorf("line %d is a %s in a %s file", lines, r.ResourceType, want)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, 0, err
	}
	// An error file's count is informative: a wrong one must not fail the
	// pull (the lines are still read and shown); the caller warns.
	if f.Count != nil && int64(*f.Count) != lines && kind != "error" {
		return 0, 0, fmt.Errorf("%d lines, the manifest says %d (truncated file?)", lines, *f.Count)
	}
	return lines, size, nil
}

func (c *Client) do(ctx context.Context, method, u string, body []byte, withToken bool, edit func(*http.Request)) (*http.Response, error) {
	var lastErr error
	for attempt := 0; attempt <= c.opt.MaxRetries; attempt++ {
		if attempt > 0 {
			if err := sleep(ctx, jitter(time.Duration(attempt)*500*time.Millisecond)); err != nil {
				return nil, err
			}
		}
		var rd io.Reader
		if body != nil {
			rd = bytes.NewReader(body)
		}
		req, err := http.NewRequestWithContext(ctx, method, u, rd)
		if err != nil {
			return nil, err
		}
		if edit != nil {
			edit(req)
		}
		if withToken && c.opt.Tokens != nil {
			tok, err := c.opt.Tokens.Token(ctx)
			if err != nil {
				return nil, fmt.Errorf("authentication: %w", err)
			}
			if tok != "" {
				req.Header.Set("Authorization", "Bearer "+tok)
			}
		}
		res, err := c.opt.HTTP.Do(req)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			lastErr = err
			continue
		}
		return res, nil
	}
	return nil, fmt.Errorf("%s %s: %w", method, u, lastErr)
}

// ApplyIncrement brings the local copy of an earlier pull up to date: lines of
// resources that this run deleted or exported again are removed from earlier runs' files.
func ApplyIncrement(dir, runID string, deleted, updated map[string]bool) (int, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.ndjson"))
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, path := range files {
		base := filepath.Base(path)
		if strings.Contains(base, "."+runID+".") || strings.HasPrefix(base, "deleted.") || strings.HasPrefix(base, "error.") {
			continue
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return removed, err
		}
		var kept [][]byte
		changed := false
		for _, line := range bytes.Split(b, []byte("\n")) {
			if len(bytes.TrimSpace(line)) == 0 {
				continue
			}
			var r struct{ ResourceType, ID string }
			json.Unmarshal(line, &r)
			key := r.ResourceType + "/" + r.ID
			if deleted[key] || updated[key] {
				removed++
				changed = true
				continue
			}
			kept = append(kept, line)
		}
		if changed {
			out := bytes.Join(kept, []byte("\n"))
			if len(out) > 0 {
				out = append(out, '\n')
			}
			if err := os.WriteFile(path+".tmp", out, 0o644); err != nil {
				return removed, err
			}
			if err := os.Rename(path+".tmp", path); err != nil {
				return removed, err
			}
		}
	}
	return removed, nil
}

// newRunID names a run by its start (to the second, as file names show it),
// with -2, -3, … when the folder already holds files of a run started in the
// same second: two runs must never write the same file names.
func newRunID(dir string, now time.Time) string {
	base := now.UTC().Format("20060102T150405")
	id := base
	for n := 2; ; n++ {
		if m, _ := filepath.Glob(filepath.Join(dir, "*."+id+".*")); len(m) == 0 {
			return id
		}
		id = fmt.Sprintf("%s-%d", base, n)
	}
}

// RunIDs reads the ids of resources in this run's output and deleted files.
func RunIDs(dir, runID string) (deleted, updated map[string]bool, err error) {
	deleted, updated = map[string]bool{}, map[string]bool{}
	files, _ := filepath.Glob(filepath.Join(dir, "*."+runID+".*.ndjson"))
	sort.Strings(files)
	for _, path := range files {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, nil, err
		}
		isDeleted := strings.HasPrefix(filepath.Base(path), "deleted.")
		for _, line := range bytes.Split(b, []byte("\n")) {
			if len(bytes.TrimSpace(line)) == 0 {
				continue
			}
			if isDeleted {
				var bundle struct {
					Entry []struct {
						Request struct{ Method, URL string }
					}
				}
				json.Unmarshal(line, &bundle)
				for _, e := range bundle.Entry {
					if e.Request.Method == "DELETE" {
						deleted[strings.TrimPrefix(e.Request.URL, "/")] = true
					}
				}
				continue
			}
			if strings.HasPrefix(filepath.Base(path), "error.") {
				continue
			}
			var r struct{ ResourceType, ID string }
			json.Unmarshal(line, &r)
			updated[r.ResourceType+"/"+r.ID] = true
		}
	}
	return deleted, updated, nil
}

// PreviousTransactionTime reads the transactionTime of the last completed
// pull in dir; an unfinished pull there must be resumed first.
func PreviousTransactionTime(dir string) (string, error) {
	if Unfinished(dir) {
		return "", fmt.Errorf("%s holds an unfinished pull: finish it with kiln pull --resume %s first", dir, dir)
	}
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return "", fmt.Errorf("no earlier pull in %s: %w", dir, err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil || m.TransactionTime == "" {
		return "", fmt.Errorf("%s/manifest.json has no transactionTime", dir)
	}
	return m.TransactionTime, nil
}

func retryAfter(v string) (time.Duration, bool) {
	if v == "" {
		return 0, false
	}
	if n, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && n >= 0 {
		return time.Duration(n) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(time.Until(t), 0), true
	}
	return 0, false
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func jitter(d time.Duration) time.Duration { return d + time.Duration(rand.Int64N(int64(d)/4+1)) }

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func describe(res *http.Response) string {
	b, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
	return describeBody(res.StatusCode, b)
}

// describeBody renders an error response, the OperationOutcome's diagnostics when there is one.
func describeBody(code int, b []byte) string {
	var oo struct {
		ResourceType string
		Issue        []struct{ Diagnostics string }
	}
	if json.Unmarshal(b, &oo) == nil && oo.ResourceType == "OperationOutcome" && len(oo.Issue) > 0 {
		var msgs []string
		for _, is := range oo.Issue {
			msgs = append(msgs, is.Diagnostics)
		}
		return fmt.Sprintf("%d %s: %s", code, http.StatusText(code), strings.Join(msgs, "; "))
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "…"
	}
	return fmt.Sprintf("%d %s %s", code, http.StatusText(code), s)
}
