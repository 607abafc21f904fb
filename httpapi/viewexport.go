package httpapi

import (
	"net/http"
	"strings"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
)

// viewExport answers POST /ViewDefinition/$viewdefinition-export (and
// /$viewdefinition-export): SQL on FHIR views over one snapshot, run as an
// export job. The token must read each view's type as $export would
// (403 otherwise); tenants and the scopes' query filters then apply to
// every resource a row comes from, as in $export.
func (s *Server) viewExport(w http.ResponseWriter, r *http.Request) {
	if err := checkContentType(r); err != nil {
		s.writeError(w, r, err)
		return
	}
	body, err := readBody(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	k := export.KickOff{
		URL:         s.publicURL(r, r.URL.RequestURI()),
		Query:       r.URL.Query(),
		ContentType: r.Header.Get("Content-Type"),
		Body:        body,
		Prefer:      strings.Join(r.Header.Values("Prefer"), ","),
		ResolveView: func(ref, at string) (map[string]any, error) { return s.readView(r, principal(r), ref, at) },
	}
	job, ok := s.startExport(w, r, func(p *auth.Principal) (*kiln.ExportRequest, error) {
		req, err := export.ParseViewKickOff(k)
		if err != nil {
			return nil, err
		}
		for _, v := range req.Views {
			if !p.CanRead(v.Resource) {
				return nil, auth.Forbidden("view %s is over %s, which the token's scopes do not let it export", v.Name, v.Resource)
			}
		}
		return req, nil
	})
	if !ok {
		return
	}
	out, err := s.viewStatusParams(r, job)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusAccepted, fhirJSON, out)
}

// viewJobStatus is a job's state in SQL on FHIR's words.
var viewJobStatus = map[kiln.JobState]string{
	kiln.JobAccepted: "accepted", kiln.JobInProgress: "in-progress", kiln.JobCompleted: "completed",
	kiln.JobFailed: "failed", kiln.JobCancelled: "cancelled",
}

// viewExportStatus answers a status poll of a $viewdefinition-export with
// the Parameters SQL on FHIR defines: 202 while it runs (with Retry-After
// and X-Progress) and, as that specification says, when it failed (status
// failed, the reason in an OperationOutcome); 200 with each view's files
// once completed.
func (s *Server) viewExportStatus(w http.ResponseWriter, r *http.Request, j *kiln.Job) {
	out, err := s.viewStatusParams(r, j)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	switch j.State {
	case kiln.JobAccepted, kiln.JobInProgress:
		s.progressHeaders(w, r, j)
		writeJSON(w, http.StatusAccepted, fhirJSON, out)
	case kiln.JobFailed:
		s.forgetPolls(j.ID)
		w.Header().Set("X-Progress", string(kiln.JobFailed))
		writeJSON(w, http.StatusAccepted, fhirJSON, out)
	case kiln.JobCompleted:
		s.forgetPolls(j.ID)
		w.Header().Set("Expires", j.Expires.UTC().Format(http.TimeFormat))
		w.Header().Set("X-Progress", string(kiln.JobCompleted))
		writeJSON(w, http.StatusOK, fhirJSON, out)
	default:
		s.writeError(w, r, kiln.Errorf(kiln.ENOTFOUND, "export job %s is not known", j.ID))
	}
}

// viewStatusParams is the status Parameters of a view export as it is now.
func (s *Server) viewStatusParams(r *http.Request, j *kiln.Job) (map[string]any, error) {
	loc := s.publicURL(r, s.cfg.BasePath+"/$export/"+j.ID)
	var ps []any
	add := func(name, key string, v any) {
		ps = append(ps, map[string]any{"name": name, key: v})
	}
	add("exportId", "valueString", j.ID)
	if j.Request.ClientTrackingID != "" {
		add("clientTrackingId", "valueString", j.Request.ClientTrackingID)
	}
	add("status", "valueCode", viewJobStatus[j.State])
	add("location", "valueUri", loc)
	if !j.Finished() {
		add("cancelUrl", "valueUri", loc)
	}
	add("_format", "valueCode", j.Request.ViewFormat)
	add("exportStartTime", "valueInstant", fhir.FormatInstant(j.Created))
	// Kiln's addition: the snapshot every row is as of, the _since of the next run.
	add("transactionTime", "valueInstant", fhir.FormatInstant(j.TransactionTime))
	switch j.State {
	case kiln.JobFailed:
		ps = append(ps, map[string]any{"name": "outcome", "resource": map[string]any{
			"resourceType": "OperationOutcome",
			"issue":        []any{map[string]any{"severity": "error", "code": "exception", "diagnostics": j.Error}},
		}})
	case kiln.JobCompleted:
		add("exportEndTime", "valueInstant", fhir.FormatInstant(j.Updated))
		add("exportDuration", "valueInteger", int64(j.Updated.Sub(j.Created).Seconds()))
		for _, v := range j.Request.Views {
			parts := []any{map[string]any{"name": "name", "valueString": v.Name}}
			for i := range j.Files {
				f := &j.Files[i]
				if f.Kind == "output" && f.Type == v.Name {
					u, _, err := s.fileURL(r, j, f)
					if err != nil {
						return nil, err
					}
					parts = append(parts, map[string]any{"name": "location", "valueUri": u})
				}
			}
			ps = append(ps, map[string]any{"name": "output", "part": parts})
		}
		for i := range j.Files {
			if f := &j.Files[i]; f.Kind == "error" {
				u, _, err := s.fileURL(r, j, f)
				if err != nil {
					return nil, err
				}
				add("error", "valueUri", u)
			}
		}
	}
	return map[string]any{"resourceType": "Parameters", "parameter": ps}, nil
}
