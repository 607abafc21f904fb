package httpapi

import (
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/view"
	"golang.org/x/time/rate"
)

// exportAllowed refuses patient-scoped tokens for every export endpoint (as Helix does).
func exportAllowed(p *auth.Principal) error {
	if p.Patient {
		return auth.Forbidden("bulk export cannot be used with patient/ scopes")
	}
	return nil
}

// downloadSlot takes one of the owner's download slots and one of the
// server's, or answers why not (429).
func (s *Server) downloadSlot(owner string) (release func(), err error) {
	s.mu.Lock()
	if s.clientDownloads[owner] >= s.cfg.MaxDownloadsPerClient {
		s.mu.Unlock()
		return nil, &kiln.Error{Code: kiln.ETHROTTLED, RetryAfter: 1,
			Message: fmt.Sprintf("this client has %d downloads running, its limit; retry shortly", s.cfg.MaxDownloadsPerClient)}
	}
	s.clientDownloads[owner]++
	s.mu.Unlock()
	mine := func() {
		s.mu.Lock()
		if s.clientDownloads[owner]--; s.clientDownloads[owner] <= 0 {
			delete(s.clientDownloads, owner)
		}
		s.mu.Unlock()
	}
	select {
	case s.downloads <- struct{}{}:
		return func() { <-s.downloads; mine() }, nil
	default:
		mine()
		return nil, &kiln.Error{Code: kiln.ETHROTTLED, RetryAfter: 1,
			Message: fmt.Sprintf("%d downloads are running, the server's limit; retry shortly", s.cfg.MaxDownloads)}
	}
}

// owns reports whether the job is p's — the same issuer and subject, still
// holding the reads the export was started with; anyone else gets the same
// 404 as an unknown id.
func owns(p *auth.Principal, j *kiln.Job) bool {
	return j.Owner == p.Owner() && p.Holds(j.Request.ExportGrant)
}

func (s *Server) kickOff(level string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var body []byte
		if r.Method == http.MethodPost {
			var err error
			if body, err = readBody(r); err != nil {
				s.writeError(w, r, err)
				return
			}
		}
		k := export.KickOff{
			Level:       level,
			URL:         s.publicURL(r, r.URL.RequestURI()),
			Query:       r.URL.Query(),
			ContentType: r.Header.Get("Content-Type"),
			Body:        body,
			Prefer:      strings.Join(r.Header.Values("Prefer"), ","),
			Accept:      r.Header.Get("Accept"),
		}
		if level == kiln.LevelGroup {
			k.GroupID = r.PathValue("id")
			if !fhir.ValidID(k.GroupID) {
				s.writeError(w, r, kiln.Invalid("id", "Group id %q is not valid", k.GroupID))
				return
			}
		}
		job, ok := s.startExport(w, r, func(*auth.Principal) (*kiln.ExportRequest, error) { return export.ParseKickOff(k) })
		if !ok {
			return
		}
		msg := fmt.Sprintf("export %s accepted; poll the Content-Location for its status", job.ID)
		if len(job.Request.Warnings) > 0 {
			msg += fmt.Sprintf(" (%d ignored parameters are listed in the error file)", len(job.Request.Warnings))
		}
		writeOutcome(w, http.StatusAccepted, "information", "informational", msg)
	}
}

// startExport is every kick-off's path ($export at each level and
// $viewdefinition-export): the token's checks, parse (which may refuse
// what the token cannot read), the kick-off rate, the token's limits on
// the request, and the job. On success the Content-Location is set and the
// caller writes the body; otherwise the error is written.
func (s *Server) startExport(w http.ResponseWriter, r *http.Request, parse func(*auth.Principal) (*kiln.ExportRequest, error)) (*kiln.Job, bool) {
	p := principal(r)
	if err := exportAllowed(p); err != nil {
		s.writeError(w, r, err)
		return nil, false
	}
	if p.ReadsNoTenant() {
		s.writeError(w, r, auth.Forbidden("the token has no access/ scope, so it may export no records: this server runs with --tenancy %s, where each token must name its tenants (access/<code>.read)", kiln.TenancyAccessTags))
		return nil, false
	}
	req, err := parse(p)
	if err != nil {
		s.writeError(w, r, err)
		return nil, false
	}
	if !s.allowKickOff(p.Owner()) {
		s.writeError(w, r, &kiln.Error{Code: kiln.ETHROTTLED, Message: fmt.Sprintf("too many kick-offs: at most %d a minute per client", s.cfg.KickOffsPerMinute), RetryAfter: 60 / max(1, s.cfg.KickOffsPerMinute/10)})
		return nil, false
	}
	applyScopes(p, req)
	job, err := s.exports.Start(r.Context(), req, p.Owner())
	if err != nil {
		s.writeError(w, r, err)
		return nil, false
	}
	w.Header().Set("Content-Location", s.publicURL(r, s.cfg.BasePath+"/$export/"+job.ID))
	return job, true
}

// allowKickOff applies the per-principal kick-off rate.
func (s *Server) allowKickOff(name string) bool {
	if s.cfg.KickOffsPerMinute < 0 {
		return true
	}
	s.mu.Lock()
	l := s.kickoffs[name]
	if l == nil {
		if len(s.kickoffs) > 10_000 {
			s.kickoffs = map[string]*rate.Limiter{}
		}
		l = rate.NewLimiter(rate.Limit(float64(s.cfg.KickOffsPerMinute)/60), min(10, s.cfg.KickOffsPerMinute))
		s.kickoffs[name] = l
	}
	s.mu.Unlock()
	return l.Allow()
}

// throttled reports whether a status poll comes too soon: polls sooner than
// half of the Retry-After this job last advertised count as early, and after
// PollBurst of them in a row the client gets 429. The time of the previous
// answer (not of the previous request) is what counts, so a poll held by
// Prefer: wait is not early when the next one follows it at once.
func (s *Server) throttled(job string) bool {
	if s.cfg.PollBurst < 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.polls[job]
	if p == nil {
		return false
	}
	if time.Since(p.last) < p.retry/2 {
		p.early++
	} else {
		p.early = 0
	}
	return p.early > s.cfg.PollBurst
}

// answered records that a status answer advising retry went out for job.
func (s *Server) answered(job string, retry time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.polls[job]
	if p == nil {
		if len(s.polls) > 10_000 {
			s.polls = map[string]*pollState{} // forget old jobs rather than grow without bound
		}
		p = &pollState{}
		s.polls[job] = p
	}
	p.last, p.retry = time.Now(), retry
}

// maxPreferWait caps RFC 7240 Prefer: wait on status polls, so a held poll
// stays well inside common proxy and client timeouts.
const maxPreferWait = 30 * time.Second

// preferWait returns the wait=N preference of the request's Prefer headers
// (0 when absent or malformed: the preference is optional, so a bad value
// is ignored as RFC 7240 §2 asks), capped at maxPreferWait.
func preferWait(r *http.Request) time.Duration {
	for _, h := range r.Header.Values("Prefer") {
		for _, pref := range strings.Split(h, ",") {
			k, v, ok := strings.Cut(strings.TrimSpace(pref), "=")
			if !ok || !strings.EqualFold(strings.TrimSpace(k), "wait") {
				continue
			}
			n, err := strconv.Atoi(strings.Trim(strings.TrimSpace(v), `"`))
			if err != nil || n <= 0 {
				return 0
			}
			return min(time.Duration(n)*time.Second, maxPreferWait)
		}
	}
	return 0
}

// holdPoll waits, for up to d, until job j has finished, and returns the
// job as last read; an error when it was cancelled (or removed) meanwhile.
// Workers may run in other processes, so the store is re-read rather than
// waiting on an in-process signal.
func (s *Server) holdPoll(ctx context.Context, j *kiln.Job, d time.Duration) (*kiln.Job, error) {
	if d <= 0 || j.Finished() {
		return j, nil
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	tick := time.NewTicker(pollHoldInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return j, nil
		case <-tick.C:
		}
		nj, err := s.exports.Job(ctx, j.ID)
		if kiln.ErrorCode(err) == kiln.ENOTFOUND {
			return nil, err
		}
		if err != nil {
			return j, nil // unreadable for now (or the wait ran out): answer with what we know
		}
		if j = nj; j.Finished() {
			return j, nil
		}
	}
}

// pollHoldInterval is how often a held poll re-reads its job: one indexed
// row, so often enough that a held poll answers within a few percent of a
// one-second export's end.
const pollHoldInterval = 50 * time.Millisecond

// statusRetryAfter is the Retry-After, in whole seconds, for a job pct%
// done after running for elapsed: the time the job needs at its rate so
// far, so that a client that honours it comes back about when the export
// is done, never more than base and never less than a second. Without
// progress yet, base.
func statusRetryAfter(base int, pct int, elapsed time.Duration) int {
	if pct <= 0 || pct >= 100 || elapsed <= 0 {
		return base
	}
	left := elapsed * time.Duration(100-pct) / time.Duration(pct)
	secs := int((left + time.Second - 1) / time.Second)
	return max(1, min(base, secs))
}

func (s *Server) forgetPolls(job string) {
	s.mu.Lock()
	delete(s.polls, job)
	s.mu.Unlock()
}

// applyScopes narrows an export to what the token may read: types outside
// its scopes become error-file lines and export nothing (Helix's behaviour);
// types under query-filtered scopes export only matching resources; records
// are limited to its access/ codes. The job keeps these for its whole run.
func applyScopes(p *auth.Principal, req *kiln.ExportRequest) {
	if !p.Read["*"] {
		req.ReadTypes = []string{} // a limit, even if it reads no type
		for t := range p.Read {
			req.ReadTypes = append(req.ReadTypes, t)
		}
		for _, t := range p.FilteredTypes() {
			req.ReadTypes = append(req.ReadTypes, t)
			if req.ScopeFilters == nil {
				req.ScopeFilters = map[string][]string{}
			}
			req.ScopeFilters[t] = p.Filters(t)
		}
		sort.Strings(req.ReadTypes)
		kept := req.Types[:0:0]
		for _, t := range req.Types {
			if p.CanRead(t) {
				kept = append(kept, t)
				continue
			}
			req.Warnings = append(req.Warnings, kiln.Issue{Expression: "_type", Message: fmt.Sprintf("Cannot access %s with scope %s", t, strings.Join(p.Scopes, " "))})
		}
		req.Types = kept
	}
	if codes := p.AccessCodes(); codes != nil {
		req.Tenants = codes
	}
}

func (s *Server) exportStatus(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("job")
	p := principal(r)
	if err := exportAllowed(p); err != nil {
		s.writeError(w, r, err)
		return
	}
	j, err := s.exports.Job(r.Context(), id)
	if err != nil || !owns(p, j) {
		if err == nil || kiln.ErrorCode(err) == kiln.ENOTFOUND {
			err = kiln.Errorf(kiln.ENOTFOUND, "export job %s is not known", id)
		}
		s.writeError(w, r, err)
		return
	}
	page := 1
	if v := r.URL.Query().Get("page"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || !j.Request.AllowPartialManifests {
			s.writeError(w, r, kiln.Invalid("page", "page %q is not a manifest page of this export", v))
			return
		}
		page = n
	}
	if !j.Finished() {
		if s.throttled(id) {
			retry := strconv.Itoa(s.cfg.RetryAfter)
			w.Header().Set("Retry-After", retry)
			writeOutcome(w, http.StatusTooManyRequests, "error", "throttled", fmt.Sprintf("polling too often: wait %s seconds between status requests", retry))
			return
		}
		if j, err = s.holdPoll(r.Context(), j, preferWait(r)); err != nil {
			s.writeError(w, r, err)
			return
		}
	}
	if len(j.Request.Views) > 0 {
		s.viewExportStatus(w, r, j)
		return
	}
	switch j.State {
	case kiln.JobAccepted, kiln.JobInProgress:
		s.progressHeaders(w, r, j)
		if j.Request.AllowPartialManifests {
			// Bulk Data v3: the files written so far, as fixed manifest pages.
			if j, err = s.exports.PartialPages(r.Context(), j); err != nil {
				s.writeError(w, r, err)
				return
			}
			if page <= len(j.Pages) {
				m, err := s.manifestPage(r, j, page)
				if err != nil {
					s.writeError(w, r, err)
					return
				}
				writeJSON(w, http.StatusAccepted, "application/json", m)
				return
			}
		}
		w.WriteHeader(http.StatusAccepted)
	case kiln.JobFailed:
		s.forgetPolls(id)
		w.Header().Set("X-Progress", string(kiln.JobFailed))
		writeOutcome(w, http.StatusInternalServerError, "error", "exception", j.Error)
	case kiln.JobCompleted:
		s.forgetPolls(id)
		w.Header().Set("Expires", j.Expires.UTC().Format(http.TimeFormat))
		w.Header().Set("X-Progress", string(kiln.JobCompleted))
		var m manifest
		if j.Request.AllowPartialManifests {
			if page > len(j.Pages) {
				s.writeError(w, r, kiln.Errorf(kiln.ENOTFOUND, "export %s has %d manifest pages, not %d", id, len(j.Pages), page))
				return
			}
			m, err = s.manifestPage(r, j, page)
		} else {
			m, err = s.manifest(r, j, j.Files)
		}
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, "application/json", m)
	default:
		s.writeError(w, r, kiln.Errorf(kiln.ENOTFOUND, "export job %s is not known", id))
	}
}

// progressHeaders sets a running job's Retry-After and X-Progress, and
// notes the answer for the poll rate limit.
func (s *Server) progressHeaders(w http.ResponseWriter, r *http.Request, j *kiln.Job) {
	progress, retry := string(j.State), s.cfg.RetryAfter
	if j.State == kiln.JobInProgress {
		pct := s.exports.Progress(r.Context(), j)
		progress = fmt.Sprintf("in-progress (%d%%)", pct)
		retry = statusRetryAfter(s.cfg.RetryAfter, pct, time.Since(j.Created))
	}
	s.answered(j.ID, time.Duration(retry)*time.Second)
	w.Header().Set("Retry-After", strconv.Itoa(retry))
	w.Header().Set("X-Progress", progress)
}

type manifestFile struct {
	// Type is left out of organized output (v3: SHALL NOT be set).
	Type  string `json:"type,omitempty"`
	URL   string `json:"url"`
	Count int64  `json:"count"`
	// ContinuesInFile is the URL of the file the last block goes on in.
	ContinuesInFile string `json:"continuesInFile,omitempty"`
}

type manifest struct {
	TransactionTime     string `json:"transactionTime"`
	Request             string `json:"request"`
	RequiresAccessToken bool   `json:"requiresAccessToken"`
	// OutputOrganizedBy echoes organizeOutputBy.
	OutputOrganizedBy string         `json:"outputOrganizedBy,omitempty"`
	Output            []manifestFile `json:"output"`
	Deleted           []manifestFile `json:"deleted"`
	Error             []manifestFile `json:"error"`
	// Errors repeats Error for Helix clients, which read that key.
	Errors []manifestFile `json:"errors"`
	// Link leads to the next manifest page (allowPartialManifests).
	Link []manifestLink `json:"link,omitempty"`
}

type manifestLink struct {
	Relation string `json:"relation"`
	URL      string `json:"url"`
}

// manifestPage is page n (from 1) of a job with allowPartialManifests: its
// output and deleted files, the job's error files (repeated on every page,
// as the IG asks), and a next link once a later page exists.
func (s *Server) manifestPage(r *http.Request, j *kiln.Job, n int) (manifest, error) {
	files := slices.Clone(j.Pages[n-1])
	files = slices.DeleteFunc(files, func(f kiln.File) bool { return f.Kind == "error" })
	for _, page := range j.Pages {
		for _, f := range page {
			if f.Kind == "error" {
				files = append(files, f)
			}
		}
	}
	m, err := s.manifest(r, j, files)
	if err == nil && n < len(j.Pages) {
		m.Link = []manifestLink{{Relation: "next", URL: s.publicURL(r, fmt.Sprintf("%s/$export/%s?page=%d", s.cfg.BasePath, j.ID, n+1))}}
	}
	return m, err
}

// manifest builds the manifest; file URLs from a URL sink (presigned S3) are
// made anew on every poll, so a client that re-polls gets fresh ones.
func (s *Server) manifest(r *http.Request, j *kiln.Job, files []kiln.File) (manifest, error) {
	m := manifest{
		TransactionTime:     fhir.FormatInstant(j.TransactionTime),
		Request:             j.Request.RequestURL,
		RequiresAccessToken: s.cfg.RequiresAccessToken,
		Output:              []manifestFile{},
		Deleted:             []manifestFile{},
		Error:               []manifestFile{},
		OutputOrganizedBy:   j.Request.OrganizeOutputBy,
	}
	fileURL := func(f *kiln.File) (string, error) {
		u, presigned, err := s.fileURL(r, j, f)
		// Capability URLs from the sink: no token is needed, or to be sent.
		m.RequiresAccessToken = m.RequiresAccessToken && !presigned
		return u, err
	}
	for i := range files {
		f := &files[i]
		u, err := fileURL(f)
		if err != nil {
			return m, err
		}
		mf := manifestFile{Type: f.Type, URL: u, Count: f.Count}
		if f.ContinuesIn != "" {
			// The file it continues in, from this list when it is here (a
			// presigned URL then), else by name: every page's files are served.
			next := &kiln.File{Name: f.ContinuesIn}
			if k := slices.IndexFunc(files, func(o kiln.File) bool { return o.Name == f.ContinuesIn }); k >= 0 {
				next = &files[k]
			}
			if mf.ContinuesInFile, err = fileURL(next); err != nil {
				return m, err
			}
		}
		switch f.Kind {
		case "output":
			m.Output = append(m.Output, mf)
		case "deleted":
			m.Deleted = append(m.Deleted, mf)
		case "error":
			m.Error = append(m.Error, mf)
		}
	}
	m.Errors = m.Error
	return m, nil
}

// fileURL is where a client downloads a job's file: the sink's own
// (presigned) URL when it gives one, else Kiln's file endpoint.
func (s *Server) fileURL(r *http.Request, j *kiln.Job, f *kiln.File) (url string, presigned bool, err error) {
	if u, ok, err := s.exports.FileURL(r.Context(), j, f); err != nil || ok {
		return u, ok, err
	}
	return s.publicURL(r, s.cfg.BasePath+"/$export/"+j.ID+"/file/"+f.Name), false, nil
}

func (s *Server) exportCancel(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("job")
	p := principal(r)
	if err := exportAllowed(p); err != nil {
		s.writeError(w, r, err)
		return
	}
	j, err := s.exports.Job(r.Context(), id)
	if err == nil && !owns(p, j) {
		err = kiln.Errorf(kiln.ENOTFOUND, "export job %s is not known", id)
	}
	if err == nil {
		err = s.exports.Cancel(r.Context(), id)
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.forgetPolls(id)
	writeOutcome(w, http.StatusAccepted, "information", "informational", fmt.Sprintf("export %s cancelled; its files are removed", id))
}

func (s *Server) exportFile(w http.ResponseWriter, r *http.Request) {
	id, name := r.PathValue("job"), r.PathValue("name")
	p := principal(r)
	if err := exportAllowed(p); err != nil {
		s.writeError(w, r, err)
		return
	}
	j, err := s.exports.Job(r.Context(), id)
	if err == nil && (!owns(p, j) || j.State != kiln.JobCompleted && !(j.Request.AllowPartialManifests && !j.Finished())) {
		err = kiln.Errorf(kiln.ENOTFOUND, "export job %s has no file %s", id, name)
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	release, err := s.downloadSlot(j.Owner)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	defer release()
	rc, f, err := s.exports.OpenFile(r.Context(), j, name)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	defer rc.Close()
	h := w.Header()
	h.Set("Content-Type", fhirNDJSON)
	gzipOK := true
	switch {
	case f.Kind != "output":
	case len(j.Request.Views) > 0:
		h.Set("Content-Type", view.ContentType[j.Request.ViewFormat])
		gzipOK = j.Request.ViewFormat != "parquet" // compressed already
	case j.Request.OutputFormat == kiln.FormatParquet:
		h.Set("Content-Type", kiln.FormatParquet)
		gzipOK = false
	}
	if !j.Expires.IsZero() {
		h.Set("Expires", j.Expires.UTC().Format(http.TimeFormat))
	}
	h.Set("Vary", "Accept-Encoding")
	h.Set("X-Resource-Count", strconv.FormatInt(f.Count, 10))
	var out io.Writer = w
	if gzipOK && acceptsGzip(r) {
		h.Set("Content-Encoding", "gzip")
		gz, _ := gzip.NewWriterLevel(w, gzip.BestSpeed)
		defer gz.Close()
		out = gz
	} else {
		h.Set("Content-Length", strconv.FormatInt(f.Bytes, 10))
	}
	if r.Method == http.MethodHead {
		return
	}
	buf := make([]byte, 256<<10)
	if _, err := io.CopyBuffer(out, rc, buf); err != nil {
		// Headers are gone; the client sees a short body. Log why.
		s.log.Warn("export file download broke off", "job", id, "file", name, "err", err)
	}
}

func acceptsGzip(r *http.Request) bool {
	for _, part := range strings.Split(r.Header.Get("Accept-Encoding"), ",") {
		enc, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		if strings.EqualFold(strings.TrimSpace(enc), "gzip") && !strings.Contains(strings.ReplaceAll(params, " ", ""), "q=0") {
			return true
		}
	}
	return false
}
