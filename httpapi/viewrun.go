package httpapi

import (
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/view"
)

// viewRunFlush is how much output $viewdefinition-run holds back before it
// starts the response: an error found in that much (a bad row) is still a
// 400 OperationOutcome; one found later cuts the response off.
const viewRunFlush = 1 << 20

// viewRunRequest is a $viewdefinition-run Parameters body, read.
type viewRunRequest struct {
	view    *view.View
	format  string
	header  bool
	patient string
	limit   int
}

// parseViewRun reads the Parameters body and the query string (_format,
// _limit, patient, header may be given in either; the body wins).
func parseViewRun(r *http.Request, body []byte, resolve func(ref, at string) (map[string]any, error)) (*viewRunRequest, error) {
	req := &viewRunRequest{header: true, format: "json"}
	q := r.URL.Query()
	for name := range q {
		switch name {
		case "_format", "_limit", "patient", "header":
		default:
			return nil, kiln.Invalid(name, "%s is not a parameter of $viewdefinition-run in the query; send the view in a Parameters body", name)
		}
	}
	var params []struct {
		name string
		at   string
		val  any
	}
	for _, name := range []string{"_format", "_limit", "patient", "header"} {
		if v := q.Get(name); v != "" {
			params = append(params, struct {
				name, at string
				val      any
			}{name, name, v})
		}
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, kiln.Invalid("body", "$viewdefinition-run needs a Parameters body with a viewResource")
	}
	m, err := fhir.DecodeJSON(body)
	if err != nil {
		return nil, kiln.Invalid("body", "body is not a JSON object: %v", err)
	}
	if rt, _ := m["resourceType"].(string); rt != "Parameters" {
		return nil, kiln.Invalid("resourceType", "$viewdefinition-run takes a Parameters resource, got %q", rt)
	}
	list, _ := m["parameter"].([]any)
	var viewDef map[string]any
	for i, p := range list {
		at := fmt.Sprintf("Parameters.parameter[%d]", i)
		pm, _ := p.(map[string]any)
		name, _ := pm["name"].(string)
		var val any
		for k, v := range pm {
			if strings.HasPrefix(k, "value") || k == "resource" {
				val = v
			}
		}
		switch name {
		case "viewResource":
			res, ok := pm["resource"].(map[string]any)
			if viewDef != nil {
				return nil, kiln.Invalid(at, "send one view: viewResource or viewReference")
			}
			if !ok {
				return nil, kiln.Invalid(at+".resource", "viewResource must carry the ViewDefinition in resource")
			}
			viewDef = res
		case "viewReference":
			ref, _ := pm["valueReference"].(map[string]any)
			s, _ := ref["reference"].(string)
			if viewDef != nil {
				return nil, kiln.Invalid(at, "send one view: viewResource or viewReference")
			}
			var err error
			if viewDef, err = resolve(s, at); err != nil {
				return nil, err
			}
		case "_format", "_limit", "patient", "header":
			params = append(params, struct {
				name, at string
				val      any
			}{name, at, val})
		case "group", "_since", "source", "resource":
			return nil, kiln.Invalid(at, "%s is not supported by this server's $viewdefinition-run", name)
		default:
			return nil, kiln.Invalid(at+".name", "%q is not a parameter of $viewdefinition-run", name)
		}
	}
	for _, p := range params {
		s := fmt.Sprint(p.val)
		switch p.name {
		case "_format":
			f, ok := view.Formats[strings.ToLower(s)]
			if !ok {
				return nil, kiln.Invalid(p.at, "_format %q is not one of csv, ndjson, json, parquet", s)
			}
			req.format = f
		case "_limit":
			var n int
			if _, err := fmt.Sscan(s, &n); err != nil || n < 1 || fmt.Sprint(n) != s {
				return nil, kiln.Invalid(p.at, "_limit must be a positive whole number, got %q", s)
			}
			req.limit = n
		case "header":
			if s != "true" && s != "false" {
				return nil, kiln.Invalid(p.at, "header must be true or false, got %q", s)
			}
			req.header = s == "true"
		case "patient":
			// valueReference {"reference":"Patient/x"}, or Patient/x, or x.
			if ref, ok := p.val.(map[string]any); ok {
				s, _ = ref["reference"].(string)
			}
			id := strings.TrimPrefix(s, "Patient/")
			if !fhir.ValidID(id) {
				return nil, kiln.Invalid(p.at, "patient must reference a Patient as Patient/id, got %q", s)
			}
			req.patient = id
		}
	}
	if viewDef == nil {
		return nil, kiln.Invalid("Parameters.parameter", "$viewdefinition-run needs a viewResource or viewReference parameter")
	}
	if req.view, err = view.Compile(viewDef); err != nil {
		return nil, err
	}
	if !fhir.R4().IsResourceType(req.view.Resource) {
		return nil, kiln.Invalid("ViewDefinition.resource", "%q is not an R4 resource type", req.view.Resource)
	}
	return req, nil
}

// viewRun answers POST /ViewDefinition/$viewdefinition-run: the rows of an
// inline view over the current resources the caller may read, with the same
// checks as search (the type scope, access tags, the scopes' query filters).
func (s *Server) viewRun(w http.ResponseWriter, r *http.Request) {
	if err := checkContentType(r); err != nil {
		s.writeError(w, r, err)
		return
	}
	body, err := readBody(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	req, err := parseViewRun(r, body, func(ref, at string) (map[string]any, error) { return s.readView(r, principal(r), ref, at) })
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	typ := req.view.Resource
	p := principal(r)
	if err := p.CheckSearch(typ); err != nil {
		s.writeError(w, r, err)
		return
	}
	sq := kiln.SearchQuery{Type: typ, Count: 500, AccessCodes: p.AccessCodes()}
	if req.patient != "" {
		if typ == "Patient" {
			sq.IDs = []string{req.patient}
		} else {
			sq.Patients = []string{req.patient}
		}
	}
	out := &heldWriter{w: w, contentType: view.ContentType[req.format]}
	vw, err := view.NewWriter(req.format, out, req.view.Columns, req.header)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	fail := func(err error) {
		if !out.started {
			s.writeError(w, r, err)
			return
		}
		// The status is sent: cut the response off so the client cannot
		// take a partial table for the whole one.
		s.log.Warn("$viewdefinition-run failed after the response began", "path", r.URL.Path, "err", err)
		panic(http.ErrAbortHandler)
	}
	rows := 0
scan:
	for {
		page, err := s.store.Search(r.Context(), sq)
		if err != nil {
			fail(err)
			return
		}
		for _, res := range page.Resources {
			if !p.Readable(auth.ActSearch, typ, res.Body) {
				continue
			}
			m, err := fhir.DecodeJSON(res.Body)
			if err != nil {
				fail(fmt.Errorf("decode %s/%s: %w", typ, res.ID, err))
				return
			}
			// A row error names the resource it came from.
			located := func(err error) error {
				var e *kiln.Error
				if errors.As(err, &e) {
					e.Message = fmt.Sprintf("%s/%s: %s", typ, res.ID, e.Message)
				}
				return err
			}
			rs, err := req.view.Rows(m)
			if err != nil {
				fail(located(err))
				return
			}
			for _, row := range rs {
				if req.limit > 0 && rows >= req.limit {
					break scan
				}
				if err := vw.Write(row); err != nil {
					fail(located(err))
					return
				}
				rows++
			}
		}
		if page.Next == 0 {
			break
		}
		sq.After = page.Next
	}
	if err := vw.Close(); err != nil {
		fail(err)
		return
	}
	if err := out.finish(); err != nil {
		s.log.Debug("$viewdefinition-run: client gone", "err", err)
	}
}

// heldWriter holds output back until viewRunFlush bytes, then starts a 200
// response and streams.
type heldWriter struct {
	w           http.ResponseWriter
	contentType string
	buf         bytes.Buffer
	started     bool
}

func (h *heldWriter) Write(b []byte) (int, error) {
	if h.started {
		return h.w.Write(b)
	}
	h.buf.Write(b)
	if h.buf.Len() >= viewRunFlush {
		return len(b), h.start()
	}
	return len(b), nil
}

func (h *heldWriter) start() error {
	h.started = true
	h.w.Header().Set("Content-Type", h.contentType)
	h.w.WriteHeader(http.StatusOK)
	_, err := h.w.Write(h.buf.Bytes())
	h.buf = bytes.Buffer{}
	return err
}

func (h *heldWriter) finish() error {
	if !h.started {
		return h.start()
	}
	return nil
}
