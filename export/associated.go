package export

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// includeAssociatedData values.
const (
	LatestProvenance   = "LatestProvenanceResources"
	RelevantProvenance = "RelevantProvenanceResources"
)

// provenance is what the Provenance pass keeps of one Provenance resource.
type provenance struct {
	id       string
	recorded time.Time
	updated  time.Time
}

// newer orders Provenance of one target: by recorded, then meta.lastUpdated,
// then id, so that "the latest" is one and the same on every run.
func (p provenance) newer(o provenance) bool {
	if !p.recorded.Equal(o.recorded) {
		return p.recorded.After(o.recorded)
	}
	if !p.updated.Equal(o.updated) {
		return p.updated.After(o.updated)
	}
	return p.id > o.id
}

// associated writes the Provenance of the resources the job exports
// (includeAssociatedData). It reads the Provenance the job may see (its
// tenants, the token's Provenance scope filters, as of the snapshot) and
// indexes them by target; then it walks the job's own selection of the
// targeted types, the same scans the other units write, to learn which
// targets are exported; last it writes the chosen Provenance. A Provenance
// the export holds anyway (Provenance in _type, or in a patient's
// compartment) is not written again. The unit reads the selection anew
// rather than waiting on the other units, so it runs beside them.
func (s *Service) associated(ctx context.Context, job *kiln.Job, u *kiln.Unit, w *partWriter) error {
	req := &job.Request
	latest := slices.Contains(req.IncludeAssociatedData, LatestProvenance)
	relevant := slices.Contains(req.IncludeAssociatedData, RelevantProvenance)
	// Provenance is found by target whenever it was recorded: the _since and
	// _until window picks the targets, not their Provenance.
	pq := baseQuery(job)
	pq.Type, pq.Since, pq.Until = "Provenance", time.Time{}, time.Time{}
	var provs []provenance
	byID := map[string]int{}
	byTarget := map[kiln.Ref][]int{}
	targeted := map[string]bool{}
	err := s.selection(ctx, req, pq, func(body []byte) error {
		var p struct {
			ID       string `json:"id"`
			Recorded string `json:"recorded"`
			Meta     struct {
				LastUpdated string `json:"lastUpdated"`
			} `json:"meta"`
			Target []struct {
				Reference string `json:"reference"`
			} `json:"target"`
		}
		if err := json.Unmarshal(body, &p); err != nil {
			return fmt.Errorf("decode stored Provenance: %w", err)
		}
		rec, _, _, _ := fhir.ParseDateTime(p.Recorded)
		upd, _, _, _ := fhir.ParseDateTime(p.Meta.LastUpdated)
		i := len(provs)
		provs = append(provs, provenance{id: p.ID, recorded: rec, updated: upd})
		byID[p.ID] = i
		for _, t := range p.Target {
			ref, ok := fhir.ParseReference(t.Reference, s.cfg.Ref)
			if !ok {
				continue
			}
			if l := byTarget[ref]; len(l) == 0 || l[len(l)-1] != i {
				byTarget[ref] = append(l, i)
			}
			targeted[ref.Type] = true
		}
		return nil
	})
	if err != nil || len(provs) == 0 {
		return err
	}
	chosen := make([]bool, len(provs))
	exported := make([]bool, len(provs))
	for _, typ := range u.Types {
		if !targeted[typ] && typ != "Provenance" {
			continue
		}
		q := baseQuery(job)
		q.Type = typ
		if req.Level != kiln.LevelSystem {
			q.Job = job.ID
			if fhir.R4().InCompartment(typ) {
				q.PatientLo, q.PatientHi = 0, u.PatientHi
			} else {
				q.Supporting = true
			}
		}
		err := s.selection(ctx, req, q, func(body []byte) error {
			var r struct {
				ID string `json:"id"`
			}
			if err := json.Unmarshal(body, &r); err != nil {
				return fmt.Errorf("decode stored %s: %w", typ, err)
			}
			if typ == "Provenance" {
				if i, ok := byID[r.ID]; ok {
					exported[i] = true
				}
			}
			list := byTarget[kiln.Ref{Type: typ, ID: r.ID}]
			if len(list) == 0 {
				return nil
			}
			if relevant {
				for _, i := range list {
					chosen[i] = true
				}
			}
			if latest {
				best := list[0]
				for _, i := range list[1:] {
					if provs[i].newer(provs[best]) {
						best = i
					}
				}
				chosen[best] = true
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	if !slices.Contains(chosen, true) {
		return nil
	}
	sub := newSubsetter("Provenance", req.Elements)
	return s.selection(ctx, req, pq, func(body []byte) error {
		var p struct {
			ID string `json:"id"`
		}
		if err := json.Unmarshal(body, &p); err != nil {
			return fmt.Errorf("decode stored Provenance: %w", err)
		}
		i, ok := byID[p.ID]
		if !ok || !chosen[i] || exported[i] {
			return nil
		}
		if sub != nil {
			b, err := sub.apply(body)
			if err != nil {
				return err
			}
			body = b
		}
		return w.write("output", "Provenance", body)
	})
}

// planAssociated adds the Provenance unit of includeAssociatedData, or says
// in the error file why there is none. Warnings must be complete before the
// error unit is planned, so plan calls it first.
func planAssociated(req *kiln.ExportRequest) bool {
	if len(req.IncludeAssociatedData) == 0 {
		return false
	}
	if req.LimitTypes && !slices.Contains(req.ReadTypes, "Provenance") {
		req.Warnings = append(req.Warnings, kiln.Issue{Expression: "includeAssociatedData",
			Message: fmt.Sprintf("no Provenance exported for includeAssociatedData=%s: the token's scopes do not grant Provenance", strings.Join(req.IncludeAssociatedData, ","))})
		return false
	}
	return true
}
