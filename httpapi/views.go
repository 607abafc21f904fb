package httpapi

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/view"
)

// viewType is the type name of stored views in scopes and URLs. R4 has no
// ViewDefinition resource: Kiln keeps SQL on FHIR's logical model apart
// from the R4 resources (no history, search or export of its own).
const viewType = "ViewDefinition"

// canWriteViews asks the policy about a change to the stored views.
func (s *Server) canWriteViews(p *auth.Principal) error {
	if s.cfg.Verifier == nil {
		return nil // no authentication: the anonymous principal may write anything
	}
	return p.CheckWriteViews(viewType)
}

// storedViewJSON is a stored view as served: its body with the server's id
// and meta.
func storedViewJSON(v *kiln.StoredView) ([]byte, error) {
	m, err := fhir.DecodeJSON(v.Body)
	if err != nil {
		return nil, fmt.Errorf("decode stored view %s: %w", v.ID, err)
	}
	m["resourceType"], m["id"] = viewType, v.ID
	m["meta"] = map[string]any{"versionId": strconv.FormatInt(v.Version, 10), "lastUpdated": fhir.FormatInstant(v.Updated)}
	return json.Marshal(m)
}

// readView resolves a viewReference ("ViewDefinition/id", relative) for p.
func (s *Server) readView(r *http.Request, p *auth.Principal, ref, at string) (map[string]any, error) {
	id, ok := strings.CutPrefix(ref, viewType+"/")
	if !ok || !fhir.ValidID(id) {
		return nil, kiln.Invalid(at, "viewReference %q: Kiln resolves ViewDefinition/id references to its stored views (not canonical or absolute URLs)", ref)
	}
	if err := p.CheckRead(viewType); err != nil {
		return nil, err
	}
	v, err := s.store.GetView(r.Context(), id)
	if err != nil {
		if kiln.ErrorCode(err) == kiln.ENOTFOUND {
			return nil, &kiln.Error{Code: kiln.ENOTFOUND, Message: fmt.Sprintf("viewReference %q: no such stored view", ref), Expression: []string{at}}
		}
		return nil, err
	}
	m, err := fhir.DecodeJSON(v.Body)
	if err != nil {
		return nil, fmt.Errorf("decode stored view %s: %w", id, err)
	}
	// Checked when stored; one that no longer compiles (a later Kiln reads
	// views more strictly) is the server's state, not the caller's mistake.
	if _, err := view.Compile(m); err != nil {
		return nil, &kiln.Error{Code: kiln.ECONFLICT, Message: fmt.Sprintf("stored %s/%s no longer compiles (%s); store it again", viewType, id, kiln.ErrorMessage(err)), Expression: []string{at}}
	}
	return m, nil
}

// viewBody validates a ViewDefinition sent to be stored and returns what is
// kept: the view without id and meta (the server's).
func viewBody(b []byte, id string) ([]byte, error) {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, kiln.Invalid("body", "send the ViewDefinition as the body")
	}
	m, err := fhir.DecodeJSON(b)
	if err != nil {
		return nil, kiln.Invalid("body", "body is not a JSON object: %v", err)
	}
	if rt, _ := m["resourceType"].(string); rt != viewType {
		return nil, kiln.Invalid("resourceType", "resourceType must be ViewDefinition, got %q", rt)
	}
	if bid, ok := m["id"]; ok && id != "" && bid != id {
		return nil, kiln.Invalid("ViewDefinition.id", "the body's id %v is not the URL's %s", bid, id)
	}
	delete(m, "id")
	delete(m, "meta")
	v, err := view.Compile(m)
	if err != nil {
		return nil, err
	}
	if !fhir.R4().IsResourceType(v.Resource) {
		return nil, kiln.Invalid("ViewDefinition.resource", "%q is not an R4 resource type", v.Resource)
	}
	return json.Marshal(m)
}

// putView answers PUT /ViewDefinition/{id} (create or update) and
// POST /ViewDefinition (create, the server choosing the id).
func (s *Server) putView(w http.ResponseWriter, r *http.Request) {
	if err := checkContentType(r); err != nil {
		s.writeError(w, r, err)
		return
	}
	if err := s.canWriteViews(principal(r)); err != nil {
		s.writeError(w, r, err)
		return
	}
	for _, h := range []string{"If-Match", "If-None-Match", "If-None-Exist"} {
		if r.Header.Get(h) != "" {
			s.writeError(w, r, kiln.Invalid(h, "%s: conditional writes of stored ViewDefinitions are not supported", h))
			return
		}
	}
	id := uuid.NewString()
	if r.Method == http.MethodPut {
		var ok bool
		if id, ok = s.resourceID(w, r); !ok {
			return
		}
	}
	b, err := readBody(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	body, err := viewBody(b, r.PathValue("id"))
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	v, err := s.store.PutView(r.Context(), id, body)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	status := http.StatusOK
	if v.Version == 1 {
		status = http.StatusCreated
		// Stored views have no history to point into: the view's own URL.
		w.Header().Set("Location", s.publicURL(r, fmt.Sprintf("%s/%s/%s", s.cfg.BasePath, viewType, id)))
	}
	s.writeView(w, r, status, v)
}

func (s *Server) writeView(w http.ResponseWriter, r *http.Request, status int, v *kiln.StoredView) {
	b, err := storedViewJSON(v)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	h := w.Header()
	h.Set("ETag", fmt.Sprintf(`W/"%d"`, v.Version))
	h.Set("Last-Modified", v.Updated.UTC().Format(http.TimeFormat))
	h.Set("Content-Type", fhirJSON)
	w.WriteHeader(status)
	w.Write(b)
}

// getView answers GET /ViewDefinition/{id}.
func (s *Server) getView(w http.ResponseWriter, r *http.Request) {
	id, ok := s.resourceID(w, r)
	if !ok {
		return
	}
	if err := principal(r).CheckRead(viewType); err != nil {
		s.writeError(w, r, err)
		return
	}
	v, err := s.store.GetView(r.Context(), id)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.writeView(w, r, http.StatusOK, v)
}

// listViews answers GET /ViewDefinition: every stored view, as a searchset
// Bundle. Views are few; there are no search parameters (any is refused).
func (s *Server) listViews(w http.ResponseWriter, r *http.Request) {
	for name := range r.URL.Query() {
		s.writeError(w, r, kiln.Invalid(name, "%s: stored ViewDefinitions are listed whole; there are no search parameters", name))
		return
	}
	if err := principal(r).CheckSearch(viewType); err != nil {
		s.writeError(w, r, err)
		return
	}
	vs, err := s.store.Views(r.Context())
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	entries := []any{}
	for _, v := range vs {
		b, err := storedViewJSON(v)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		entries = append(entries, map[string]any{
			"fullUrl":  s.publicURL(r, s.cfg.BasePath+"/"+viewType+"/"+v.ID),
			"resource": json.RawMessage(b),
			"search":   map[string]string{"mode": "match"},
		})
	}
	writeJSON(w, http.StatusOK, fhirJSON, map[string]any{"resourceType": "Bundle", "type": "searchset", "total": len(vs), "entry": entries})
}

// deleteView answers DELETE /ViewDefinition/{id}.
func (s *Server) deleteView(w http.ResponseWriter, r *http.Request) {
	id, ok := s.resourceID(w, r)
	if !ok {
		return
	}
	if err := s.canWriteViews(principal(r)); err != nil {
		s.writeError(w, r, err)
		return
	}
	if err := s.store.DeleteView(r.Context(), id); err != nil {
		s.writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
