package httpapi

import (
	"bytes"
	"encoding/json"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/ingest"
)

func (s *Server) resourceType(w http.ResponseWriter, r *http.Request) (string, bool) {
	t := r.PathValue("type")
	if !fhir.R4().IsResourceType(t) {
		writeOutcome(w, http.StatusNotFound, "error", "not-supported", fmt.Sprintf("%q is not an R4 resource type", t), "type")
		return "", false
	}
	return t, true
}

func (s *Server) resourceID(w http.ResponseWriter, r *http.Request) (string, bool) {
	id := r.PathValue("id")
	if !fhir.ValidID(id) {
		writeOutcome(w, http.StatusBadRequest, "error", "invalid", fmt.Sprintf("id %q is not 1-64 characters of A-Z, a-z, 0-9, '-' and '.'", id), "id")
		return "", false
	}
	return id, true
}

func checkContentType(r *http.Request) error {
	ct := r.Header.Get("Content-Type")
	if ct == "" {
		return nil
	}
	mt, _, _ := strings.Cut(ct, ";")
	switch strings.TrimSpace(strings.ToLower(mt)) {
	case "application/fhir+json", "application/json", "application/json+fhir":
		return nil
	}
	return &kiln.Error{Code: kiln.EUNSUPPORTED, Message: fmt.Sprintf("Content-Type %q is not supported: send application/fhir+json", ct), Expression: []string{"Content-Type"}}
}

// parseResource reads and validates the body as a resource of type typ.
func (s *Server) parseResource(r *http.Request, typ string) (*fhir.Parsed, error) {
	if err := checkContentType(r); err != nil {
		return nil, err
	}
	body, err := readBody(r)
	if err != nil {
		return nil, err
	}
	p, err := fhir.Parse(body)
	if err != nil {
		return nil, err
	}
	if p.Type != typ {
		return nil, kiln.Invalid("resourceType", "resourceType %q does not match the URL's %s", p.Type, typ)
	}
	return p, nil
}

func (s *Server) writeResource(w http.ResponseWriter, r *http.Request, status int, res *kiln.Resource) {
	h := w.Header()
	h.Set("Content-Type", fhirJSON)
	h.Set("ETag", fmt.Sprintf(`W/"%d"`, res.Version))
	h.Set("Last-Modified", res.LastUpdated.UTC().Format(http.TimeFormat))
	if status == http.StatusCreated {
		h.Set("Location", s.publicURL(r, fmt.Sprintf("%s/%s/%s/_history/%d", s.cfg.BasePath, res.Type, res.ID, res.Version)))
	}
	w.WriteHeader(status)
	w.Write(res.Body)
}

func (s *Server) create(w http.ResponseWriter, r *http.Request) {
	typ, ok := s.resourceType(w, r)
	if !ok {
		return
	}
	p, err := s.parseResource(r, typ)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	wr := fhir.Prepare(p, uuid.NewString(), s.refOptions(r))
	wr.Kind = kiln.Create
	if err := s.authorizeWrite(r, &wr); err != nil {
		s.writeError(w, r, err)
		return
	}
	res, err := s.store.Write(r.Context(), []kiln.Write{wr})
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeResource(w, r, http.StatusCreated, &res[0].Resource)
}

func ifMatch(r *http.Request) (int64, error) {
	v := r.Header.Get("If-Match")
	if v == "" {
		return 0, nil
	}
	v = strings.Trim(strings.TrimPrefix(strings.TrimSpace(v), "W/"), `"`)
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 1 {
		return 0, kiln.Invalid("If-Match", "If-Match %q is not a version ETag such as W/\"3\"", r.Header.Get("If-Match"))
	}
	return n, nil
}

func (s *Server) update(w http.ResponseWriter, r *http.Request) {
	typ, ok := s.resourceType(w, r)
	if !ok {
		return
	}
	id, ok := s.resourceID(w, r)
	if !ok {
		return
	}
	p, err := s.parseResource(r, typ)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if p.ID != "" && p.ID != id {
		s.writeError(w, r, kiln.Invalid(typ+".id", "resource id %q does not match the URL's %q", p.ID, id))
		return
	}
	wr := fhir.Prepare(p, id, s.refOptions(r))
	if wr.IfMatch, err = ifMatch(r); err != nil {
		s.writeError(w, r, err)
		return
	}
	if err := s.authorizeWrite(r, &wr); err != nil {
		s.writeError(w, r, err)
		return
	}
	res, err := s.store.Write(r.Context(), []kiln.Write{wr})
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	out := res[0]
	if out.Unchanged {
		cur, err := s.store.Read(r.Context(), typ, id)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		s.writeResource(w, r, http.StatusOK, cur)
		return
	}
	status := http.StatusOK
	if out.Created {
		status = http.StatusCreated
	}
	s.writeResource(w, r, status, &out.Resource)
}

func (s *Server) read(w http.ResponseWriter, r *http.Request) {
	typ, ok := s.resourceType(w, r)
	if !ok {
		return
	}
	id, ok := s.resourceID(w, r)
	if !ok {
		return
	}
	if err := principal(r).CheckRead(typ); err != nil {
		s.writeError(w, r, err)
		return
	}
	res, err := s.store.Read(r.Context(), typ, id)
	if err == nil && !principal(r).Readable(auth.ActRead, typ, res.Body) {
		err = kiln.Errorf(kiln.ENOTFOUND, "%s/%s is not known", typ, id)
	}
	if kiln.ErrorCode(err) == kiln.EGONE {
		// 410 only to a caller who could read the record before its deletion:
		// to anyone else a deleted record is as unknown as one never written.
		if last, lerr := s.lastBody(r.Context(), typ, id); lerr != nil {
			err = lerr
		} else if last == nil || !principal(r).Readable(auth.ActRead, typ, last) {
			err = kiln.Errorf(kiln.ENOTFOUND, "%s/%s is not known", typ, id)
		}
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeRead(w, r, res)
}

// writeRead answers a read or vread. A Binary is served as its own content,
// with its contentType, unless the client asks for FHIR (R4 Binary, "Serving
// Binary Resources using the RESTful API": a request whose Accept names no
// FHIR format gets the native form).
func (s *Server) writeRead(w http.ResponseWriter, r *http.Request, res *kiln.Resource) {
	if res.Type != "Binary" || wantsFHIR(r) {
		s.writeResource(w, r, http.StatusOK, res)
		return
	}
	var b struct {
		ContentType string `json:"contentType"`
		Data        []byte `json:"data"` // base64 in JSON
	}
	if err := json.Unmarshal(res.Body, &b); err != nil || b.ContentType == "" {
		s.writeResource(w, r, http.StatusOK, res) // nothing native to serve
		return
	}
	h := w.Header()
	h.Set("Content-Type", b.ContentType)
	h.Set("ETag", fmt.Sprintf(`W/"%d"`, res.Version))
	h.Set("Last-Modified", res.LastUpdated.UTC().Format(http.TimeFormat))
	// The content is whatever a client stored: never let a browser run it
	// in this origin.
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Security-Policy", "sandbox")
	h.Set("Content-Disposition", "attachment")
	w.WriteHeader(http.StatusOK)
	w.Write(b.Data)
}

// wantsFHIR reports whether the request asks for a FHIR format: _format, or
// an Accept naming FHIR JSON (or plain JSON, which Kiln serves as FHIR).
func wantsFHIR(r *http.Request) bool {
	if r.URL.Query().Get("_format") != "" {
		return true
	}
	for _, part := range strings.Split(strings.Join(r.Header.Values("Accept"), ","), ",") {
		mt, _, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err != nil {
			continue
		}
		switch mt {
		case "application/fhir+json", "application/json", "application/fhir+xml", "application/xml+fhir", "application/json+fhir":
			return true
		}
	}
	return false
}

func (s *Server) vread(w http.ResponseWriter, r *http.Request) {
	typ, ok := s.resourceType(w, r)
	if !ok {
		return
	}
	id, ok := s.resourceID(w, r)
	if !ok {
		return
	}
	v, err := strconv.ParseInt(r.PathValue("vid"), 10, 64)
	if err != nil || v < 1 {
		writeOutcome(w, http.StatusBadRequest, "error", "invalid", fmt.Sprintf("version %q is not a positive whole number", r.PathValue("vid")), "vid")
		return
	}
	if err := principal(r).CheckRead(typ); err != nil {
		s.writeError(w, r, err)
		return
	}
	res, err := s.store.ReadVersion(r.Context(), typ, id, v)
	if err == nil && !principal(r).Readable(auth.ActRead, typ, res.Body) {
		err = kiln.Errorf(kiln.ENOTFOUND, "%s/%s has no version %d", typ, id, v)
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeRead(w, r, res)
}

func (s *Server) delete(w http.ResponseWriter, r *http.Request) {
	typ, ok := s.resourceType(w, r)
	if !ok {
		return
	}
	id, ok := s.resourceID(w, r)
	if !ok {
		return
	}
	del := kiln.Write{Kind: kiln.Delete, Type: typ, ID: id}
	if err := s.authorizeWrite(r, &del); err != nil {
		s.writeError(w, r, err)
		return
	}
	if _, err := s.store.Write(r.Context(), []kiln.Write{del}); err != nil {
		s.writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// bundleEntry is written by hand so that stored bytes go out unchanged.
func appendEntry(buf *bytes.Buffer, fullURL string, body []byte, extra string) {
	if buf.Len() > 0 && buf.Bytes()[buf.Len()-1] != '[' {
		buf.WriteByte(',')
	}
	buf.WriteByte('{')
	if fullURL != "" {
		buf.WriteString(`"fullUrl":`)
		buf.Write(fhir.AppendString(nil, fullURL))
		buf.WriteByte(',')
	}
	if body != nil {
		buf.WriteString(`"resource":`)
		buf.Write(body)
		if extra != "" {
			buf.WriteByte(',')
		}
	}
	buf.WriteString(extra)
	buf.WriteByte('}')
}

func (s *Server) history(w http.ResponseWriter, r *http.Request) {
	typ, ok := s.resourceType(w, r)
	if !ok {
		return
	}
	id, ok := s.resourceID(w, r)
	if !ok {
		return
	}
	if err := principal(r).CheckRead(typ); err != nil {
		s.writeError(w, r, err)
		return
	}
	versions, err := s.store.History(r.Context(), typ, id)
	if err == nil {
		versions = principal(r).ReadableHistory(typ, versions)
		if len(versions) == 0 {
			err = kiln.Errorf(kiln.ENOTFOUND, "%s/%s is not known", typ, id)
		}
	}
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	var buf bytes.Buffer
	fmt.Fprintf(&buf, `{"resourceType":"Bundle","type":"history","total":%d,"entry":[`, len(versions))
	for _, v := range versions {
		full := s.publicURL(r, fmt.Sprintf("%s/%s/%s", s.cfg.BasePath, typ, id))
		method, status := "PUT", "200"
		if v.Version == 1 {
			method, status = "POST", "201"
		}
		if v.Deleted {
			method, status = "DELETE", "204"
			appendEntry(&buf, full, nil, fmt.Sprintf(`"request":{"method":"DELETE","url":"%s/%s"},"response":{"status":"%s","etag":"W/\"%d\"","lastModified":"%s"}`, typ, id, status, v.Version, fhir.FormatInstant(v.LastUpdated)))
			continue
		}
		url := typ
		if method == "PUT" {
			url = typ + "/" + id
		}
		appendEntry(&buf, full, v.Body, fmt.Sprintf(`"request":{"method":"%s","url":"%s"},"response":{"status":"%s","etag":"W/\"%d\"","lastModified":"%s"}`, method, url, status, v.Version, fhir.FormatInstant(v.LastUpdated)))
	}
	buf.WriteString("]}")
	w.Header().Set("Content-Type", fhirJSON)
	w.Write(buf.Bytes())
}

// searchResultParams are the result parameters REST search takes; the rest
// (_include, _sort, _elements, _summary, …) are refused rather than ignored.
var searchResultParams = map[string]bool{"_count": true, "_cursor": true, "_total": true, "_format": true}

// search answers GET /{type}?… with the search engine of package fhir: _id is
// answered by the store, every other parameter by evaluating the R4 search
// parameter on each candidate. Pages are keyset cursors. total is given when
// the search reached the end, or always with _total=accurate; never with _total=none.
func (s *Server) search(w http.ResponseWriter, r *http.Request) {
	typ, ok := s.resourceType(w, r)
	if !ok {
		return
	}
	if err := principal(r).CheckSearch(typ); err != nil {
		s.writeError(w, r, err)
		return
	}
	vals := r.URL.Query()
	filter := url.Values{}
	for name, vs := range vals {
		code, _, _ := strings.Cut(name, ":")
		if strings.HasPrefix(code, "_") && !searchResultParams[code] && fhir.LookupParam(typ, code) == nil {
			s.writeError(w, r, kiln.Invalid(name, "%s is not supported in search", name))
			return
		}
		if !searchResultParams[code] {
			filter[name] = vs
		}
	}
	query, err := fhir.ParseQuery(typ, filter, false)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	count := 50
	if v := vals.Get("_count"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > 1000 {
			s.writeError(w, r, kiln.Invalid("_count", "_count must be a whole number from 0 to 1000, got %q", v))
			return
		}
		count = n
	}
	totalMode := vals.Get("_total")
	if totalMode != "" && totalMode != "none" && totalMode != "accurate" && totalMode != "estimate" {
		s.writeError(w, r, kiln.Invalid("_total", "_total must be none, estimate or accurate, got %q", totalMode))
		return
	}
	sq := kiln.SearchQuery{Type: typ, Count: 500, AccessCodes: principal(r).AccessCodes()}
	scope := cursorScope(typ, sq.AccessCodes)
	first := true
	if v := vals.Get("_cursor"); v != "" {
		n, err := s.decodeCursor(r.Context(), v, scope)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		sq.After = n
		first = false
	}
	// _id without a modifier narrows the store query itself; so does a
	// reference to patients through an element that links the Patient
	// compartment (its index), the clause still checked on each resource.
	var rest []fhir.Clause
	for _, c := range query.Clauses {
		if c.Code == "_id" && c.Modifier == "" && sq.IDs == nil {
			sq.IDs = c.Values
			continue
		}
		if ids, ok := patientsOf(typ, c); ok && sq.Patients == nil {
			sq.Patients = ids
		}
		rest = append(rest, c)
	}
	query.Clauses = rest
	p := principal(r)
	scoped := p.Restricted(auth.ActSearch, typ)
	if pid, only := p.PatientOnly(auth.ActSearch, typ); only && sq.Patients == nil {
		sq.Patients = []string{pid} // the compartment index narrows it; Matches still decides
	}
	sq.Total = len(query.Clauses) == 0 && first && !scoped && totalMode != "none"
	var matches []kiln.Resource
	var next int64
	matched, total := 0, -1
scan:
	for {
		page, err := s.store.Search(r.Context(), sq)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		if sq.Total {
			total = page.Total // nothing to evaluate: the store counted
			sq.Total = false
		}
		for _, res := range page.Resources {
			ok, err := query.MatchJSON(res.Body)
			if err != nil {
				s.writeError(w, r, err)
				return
			}
			if !ok || scoped && !p.Matches(auth.ActSearch, typ, res.Body) {
				continue
			}
			matched++
			if len(matches) < count {
				matches = append(matches, res)
				continue
			}
			if next == 0 && len(matches) > 0 {
				next = matches[len(matches)-1].Cursor
			}
			if totalMode != "accurate" || total >= 0 {
				break scan
			}
		}
		if page.Next == 0 {
			if first && total < 0 {
				total = matched // the whole type was evaluated
			}
			break
		}
		sq.After = page.Next
	}
	self := s.publicURL(r, r.URL.Path) + "?" + vals.Encode()
	var buf bytes.Buffer
	buf.WriteString(`{"resourceType":"Bundle","type":"searchset"`)
	if total >= 0 && totalMode != "none" {
		fmt.Fprintf(&buf, `,"total":%d`, total)
	}
	fmt.Fprintf(&buf, `,"link":[{"relation":"self","url":%s}`, fhir.AppendString(nil, self))
	if next > 0 {
		cursor, err := s.encodeCursor(r.Context(), next, scope)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		nv := cloneValues(vals)
		nv.Set("_cursor", cursor)
		fmt.Fprintf(&buf, `,{"relation":"next","url":%s}`, fhir.AppendString(nil, s.publicURL(r, r.URL.Path)+"?"+nv.Encode()))
	}
	buf.WriteString(`],"entry":[`)
	for _, res := range matches {
		appendEntry(&buf, s.publicURL(r, fmt.Sprintf("%s/%s/%s", s.cfg.BasePath, typ, res.ID)), res.Body, `"search":{"mode":"match"}`)
	}
	buf.WriteString("]}")
	w.Header().Set("Content-Type", fhirJSON)
	w.Write(buf.Bytes())
}

// patientsOf returns the patient ids a clause references when the store's
// compartment index can narrow it: a reference parameter without modifier
// that links typ to the Patient compartment, every value naming a Patient
// (Patient/x, or x when the parameter targets only Patient).
func patientsOf(typ string, c fhir.Clause) ([]string, bool) {
	if c.Modifier != "" || !fhir.PatientLinked(typ, c.Param) || len(c.Values) == 0 {
		return nil, false
	}
	onlyPatient := len(c.Param.Targets) == 1 && c.Param.Targets[0] == "Patient"
	ids := make([]string, 0, len(c.Values))
	for _, v := range c.Values {
		id, hasType := strings.CutPrefix(v, "Patient/")
		if id == "" || strings.ContainsAny(id, "/:|") || !hasType && !onlyPatient {
			return nil, false
		}
		ids = append(ids, id)
	}
	return ids, true
}

func cloneValues(v url.Values) url.Values {
	out := url.Values{}
	for k, vs := range v {
		out[k] = append([]string(nil), vs...)
	}
	return out
}

// bundle processes a batch or transaction Bundle. A transaction is atomic:
// any bad entry or failed write stores nothing.
func (s *Server) bundle(w http.ResponseWriter, r *http.Request) {
	if err := checkContentType(r); err != nil {
		s.writeError(w, r, err)
		return
	}
	body, err := readBody(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		s.writeError(w, r, kiln.Invalid("body", "body is not a JSON object: %v", err))
		return
	}
	// Entries are validated one by one below, so that a batch can answer per entry.
	if rt, _ := m["resourceType"].(string); rt != "Bundle" {
		s.writeError(w, r, kiln.Invalid("resourceType", "POST to the base takes a Bundle, got %q", rt))
		return
	}
	kind, entries, err := ingest.PrepareBundle(m, ingest.BundleOptions{Ref: s.refOptions(r), NewID: uuid.NewString})
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	switch kind {
	case "transaction":
		writes := make([]kiln.Write, 0, len(entries))
		for _, e := range entries {
			if e.Err == nil {
				e.Err = s.authorizeWrite(r, &e.Write)
			}
			if e.Err != nil {
				s.writeError(w, r, e.Err)
				return
			}
			writes = append(writes, e.Write)
		}
		res, err := s.store.Write(r.Context(), writes)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		var buf bytes.Buffer
		buf.WriteString(`{"resourceType":"Bundle","type":"transaction-response","entry":[`)
		for i, e := range entries {
			appendEntry(&buf, "", nil, s.entryResponse(r, e, res[i], nil))
		}
		buf.WriteString("]}")
		w.Header().Set("Content-Type", fhirJSON)
		w.Write(buf.Bytes())
	case "batch":
		var buf bytes.Buffer
		buf.WriteString(`{"resourceType":"Bundle","type":"batch-response","entry":[`)
		for _, e := range entries {
			var res kiln.WriteResult
			err := e.Err
			if err == nil {
				err = s.authorizeWrite(r, &e.Write)
			}
			if err == nil {
				var out []kiln.WriteResult
				if out, err = s.store.Write(r.Context(), []kiln.Write{e.Write}); err == nil {
					res = out[0]
				}
			}
			appendEntry(&buf, "", nil, s.entryResponse(r, e, res, err))
		}
		buf.WriteString("]}")
		w.Header().Set("Content-Type", fhirJSON)
		w.Write(buf.Bytes())
	default:
		s.writeError(w, r, kiln.Invalid("Bundle.type", "Bundle.type must be batch or transaction, got %q", kind))
	}
}

func (s *Server) entryResponse(r *http.Request, e ingest.Entry, res kiln.WriteResult, err error) string {
	if err != nil {
		m, ok := errorMap[kiln.ErrorCode(err)]
		if !ok {
			m = errorMap[kiln.EINTERNAL]
		}
		oo, _ := json.Marshal(outcome{ResourceType: "OperationOutcome", Issue: []issue{{Severity: "error", Code: m.code, Diagnostics: kiln.ErrorMessage(err)}}})
		return fmt.Sprintf(`"response":{"status":"%d","outcome":%s}`, m.status, oo)
	}
	status := "200"
	switch {
	case e.Write.Kind == kiln.Delete:
		status = "204"
	case res.Created:
		status = "201"
	}
	loc := ""
	if e.Write.Kind != kiln.Delete {
		loc = fmt.Sprintf(`"location":%s,`, fhir.AppendString(nil, fmt.Sprintf("%s/%s/_history/%d", res.Type, res.ID, res.Version)))
	}
	lm := ""
	if !res.LastUpdated.IsZero() {
		lm = fmt.Sprintf(`,"lastModified":"%s"`, fhir.FormatInstant(res.LastUpdated))
	}
	return fmt.Sprintf(`"response":{"status":"%s",%s"etag":"W/\"%d\""%s}`, status, loc, res.Version, lm)
}
