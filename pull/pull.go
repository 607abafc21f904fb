// Package pull is a Bulk Data client: it kicks off an export on any
// conformant server, polls it honouring Retry-After, downloads the files in
// parallel with retries, verifies them, and can resume after an interruption
// or pull incrementally (applying deletions to the local copy).
package pull

import (
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
	"slices"
	"strconv"
	"strings"
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
	// Format is "parquet" for _outputFormat=application/vnd.apache.parquet
	// (resource files saved as TYPE.RUN.NNN.parquet); empty for NDJSON.
	Format string `json:"format,omitempty"`
	// Incremental marks a --since-last run, recorded in the folder's state
	// with the kick-off itself so that a crash right after cannot turn it
	// into a full pull on --resume.
	Incremental bool `json:"incremental,omitempty"`
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
	if req.Format == FormatParquet {
		add("_outputFormat", "valueString", parquetMIME)
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

// FormatParquet asks for Parquet resource files (Request.Format).
const FormatParquet = "parquet"

const parquetMIME = "application/vnd.apache.parquet"

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
	// AllowPartial commits an export whose error files report failures
	// (severity error or fatal); without it such a run stays uncommitted.
	AllowPartial bool
	// Failpoint, when set, is called at each named step of a pull (see
	// the Step constants); the crash tests kill the process there.
	Failpoint func(Step)
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
	// raw is the server's manifest as sent: the local manifest.json keeps
	// every field of it and adds the folder's file list.
	raw []byte
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
	// Issues are the OperationOutcome issues of the error files.
	Issues []Issue
	// Increment is what an incremental run changed in the folder.
	Increment Increment
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
	if req.Format != "" && req.Format != FormatParquet {
		return nil, fmt.Errorf("format %q: use %s or leave it empty for NDJSON", req.Format, FormatParquet)
	}
	if req.Format == FormatParquet && req.Incremental {
		// An increment is applied by rewriting earlier files' lines.
		return nil, fmt.Errorf("an incremental pull (--since-last) needs NDJSON files, not Parquet")
	}
	if err := os.MkdirAll(c.opt.Out, 0o700); err != nil {
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
	if req.Format == FormatParquet {
		q.Set("_outputFormat", parquetMIME)
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
		res, err = c.do(ctx, method, u, body, []string{req.Server}, func(r *http.Request) {
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
	st := &State{Request: req, StatusURL: loc, Started: now, RunID: newRunID(c.opt.Out, now), Incremental: req.Incremental}
	if err := c.save(st); err != nil {
		return nil, err
	}
	c.failpoint(StepKickedOff)
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

func (c *Client) save(st *State) error {
	b, _ := json.MarshalIndent(st, "", "  ")
	tmp := filepath.Join(c.opt.Out, stateFile+".tmp")
	return writeAtomic(tmp, filepath.Join(c.opt.Out, stateFile), b)
}

// Cancel asks the server to cancel (or forget) the export.
func (c *Client) Cancel(ctx context.Context, st *State) error {
	res, err := c.do(ctx, http.MethodDelete, st.StatusURL, nil, st.origins(), nil)
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
		c.failpoint(StepPoll)
		res, err := c.do(ctx, http.MethodGet, st.StatusURL, nil, st.origins(), func(r *http.Request) {
			r.Header.Set("Accept", "application/json")
			// RFC 7240: a server that supports it answers as soon as the
			// export ends, within the wait, instead of a poll interval later.
			r.Header.Set("Prefer", "wait=10")
		})
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
			m.raw = body
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
			wait, ok := retryAfter(res.Header.Get("Retry-After"))
			if !ok {
				wait = jitter(time.Duration(fails) * time.Second)
			}
			c.say("status: server error %d; retrying in %s", res.StatusCode, min(wait, c.opt.MaxWait))
			if err := c.opt.Sleep(ctx, min(wait, c.opt.MaxWait)); err != nil {
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

// origins are where the pull's bearer token may go: the server it was
// started with and the status URL that server answered with (the same
// server under the name it gives itself, e.g. 127.0.0.1 for localhost).
func (st *State) origins() []string { return []string{st.Request.Server, st.StatusURL} }

// do sends a request, retrying network errors; the bearer token goes only
// to the origins (scheme, host and port) of tokenFor (none when empty): a
// file URL on another host — a presigned URL, or a server sending the
// client elsewhere — never gets it.
func (c *Client) do(ctx context.Context, method, u string, body []byte, tokenFor []string, edit func(*http.Request)) (*http.Response, error) {
	var lastErr error
	for attempt := 0; attempt <= c.opt.MaxRetries; attempt++ {
		if attempt > 0 {
			if err := c.opt.Sleep(ctx, jitter(time.Duration(attempt)*500*time.Millisecond)); err != nil {
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
		if c.opt.Tokens != nil && slices.ContainsFunc(tokenFor, func(base string) bool { return sameOrigin(req.URL, base) }) {
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

// sameOrigin reports whether u is on the origin of base.
func sameOrigin(u *url.URL, base string) bool {
	b, err := url.Parse(base)
	if err != nil {
		return false
	}
	port := func(x *url.URL) string {
		if p := x.Port(); p != "" {
			return p
		}
		return map[string]string{"http": "80", "https": "443"}[strings.ToLower(x.Scheme)]
	}
	return strings.EqualFold(u.Scheme, b.Scheme) && strings.EqualFold(u.Hostname(), b.Hostname()) && port(u) == port(b)
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
