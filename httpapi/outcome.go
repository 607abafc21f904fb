package httpapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/kiln-fhir/kiln"
)

// status and OperationOutcome issue code for each domain error code.
var errorMap = map[string]struct {
	status int
	code   string
}{
	kiln.EINVALID:      {http.StatusBadRequest, "invalid"},
	kiln.ENOTFOUND:     {http.StatusNotFound, "not-found"},
	kiln.EGONE:         {http.StatusGone, "deleted"},
	kiln.ECONFLICT:     {http.StatusConflict, "conflict"},
	kiln.EPRECONDITION: {http.StatusPreconditionFailed, "conflict"},
	kiln.ETOOLARGE:     {http.StatusRequestEntityTooLarge, "too-costly"},
	kiln.ETHROTTLED:    {http.StatusTooManyRequests, "throttled"},
	kiln.EUNAUTHORIZED: {http.StatusUnauthorized, "security"},
	kiln.EFORBIDDEN:    {http.StatusForbidden, "forbidden"},
	kiln.EUNSUPPORTED:  {http.StatusUnsupportedMediaType, "not-supported"},
	kiln.EINTERNAL:     {http.StatusInternalServerError, "exception"},
}

type issue struct {
	Severity    string   `json:"severity"`
	Code        string   `json:"code"`
	Diagnostics string   `json:"diagnostics,omitempty"`
	Expression  []string `json:"expression,omitempty"`
}

type outcome struct {
	ResourceType string  `json:"resourceType"`
	Issue        []issue `json:"issue"`
}

func writeJSON(w http.ResponseWriter, status int, contentType string, v any) {
	// URLs in manifests keep their '&': no HTML escaping.
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", contentType)
	w.WriteHeader(status)
	w.Write(bytes.TrimSuffix(buf.Bytes(), []byte{'\n'}))
}

func writeOutcome(w http.ResponseWriter, status int, severity, code, msg string, expr ...string) {
	writeJSON(w, status, fhirJSON, outcome{ResourceType: "OperationOutcome", Issue: []issue{{Severity: severity, Code: code, Diagnostics: msg, Expression: expr}}})
}

// writeError answers err as an OperationOutcome. Internal errors are logged
// in full and shown only as "internal error" with the request id.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	var e *kiln.Error
	if r.Context().Err() != nil && errors.Is(err, r.Context().Err()) {
		// The client went away; nobody reads this answer. 499 (nginx's
		// "client closed request") keeps it apart from server errors in metrics.
		s.log.Debug("client gone", "method", r.Method, "path", r.URL.Path, "err", err)
		w.WriteHeader(499)
		return
	}
	if !errors.As(err, &e) && kiln.Transient(s.store, err) {
		s.log.Warn("store unavailable", "method", r.Method, "path", r.URL.Path, "err", err)
		w.Header().Set("Retry-After", "5")
		writeOutcome(w, http.StatusServiceUnavailable, "error", "transient", "the database is unavailable for the moment; try again shortly")
		return
	}
	if e == nil {
		id := w.Header().Get("X-Request-Id")
		s.log.Error("internal error", "method", r.Method, "path", r.URL.Path, "request", id, "err", err)
		writeOutcome(w, http.StatusInternalServerError, "error", "exception", "internal error (request "+id+")")
		return
	}
	m, ok := errorMap[e.Code]
	if !ok {
		m = errorMap[kiln.EINTERNAL]
	}
	if e.Code == kiln.ETHROTTLED && e.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(e.RetryAfter))
	}
	if e.Code == kiln.EUNAUTHORIZED {
		w.Header().Set("WWW-Authenticate", `Bearer realm="kiln"`)
	}
	if e.Code == kiln.EFORBIDDEN && s.cfg.Verifier != nil {
		// RFC 6750 §3.1: the token is good but does not reach this far.
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="kiln", error="insufficient_scope", error_description="%s"`, strings.ReplaceAll(e.Message, `"`, "'")))
	}
	oo := outcome{ResourceType: "OperationOutcome", Issue: []issue{{Severity: "error", Code: m.code, Diagnostics: e.Message, Expression: e.Expression}}}
	for i, is := range e.Issues {
		if i == 0 {
			continue // the first issue is the message itself
		}
		oo.Issue = append(oo.Issue, issue{Severity: "error", Code: m.code, Diagnostics: is.Message, Expression: []string{is.Expression}})
	}
	if m.status >= 500 {
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	} else {
		s.log.Debug("request refused", "method", r.Method, "path", r.URL.Path, "status", m.status, "err", err)
	}
	writeJSON(w, m.status, fhirJSON, oo)
}
