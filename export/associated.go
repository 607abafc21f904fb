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
	id string
	// recorded and updated, in Unix milliseconds (FHIR instants are no finer).
	recorded, updated int64
}

// newer orders Provenance of one target: by recorded, then meta.lastUpdated,
// then id, so that "the latest" is one and the same on every run.
func (p provenance) newer(o provenance) bool {
	if p.recorded != o.recorded {
		return p.recorded > o.recorded
	}
	if p.updated != o.updated {
		return p.updated > o.updated
	}
	return p.id > o.id
}

// targetIndex maps a target ("Type/id") to the Provenance that name it. Most
// targets have one Provenance, kept in one; the rest are in more. It is the
// pass's memory: about 100 bytes per target of an exported type.
type targetIndex struct {
	one  map[string]int32
	more map[string][]int32
}

func (x *targetIndex) add(key string, i int32) {
	first, ok := x.one[key]
	switch {
	case !ok:
		x.one[key] = i
	case first == i:
	default:
		l := x.more[key]
		if len(l) == 0 || l[len(l)-1] != i {
			x.more[key] = append(l, i)
		}
	}
}

// each calls fn with the Provenance of key.
func (x *targetIndex) each(key string, fn func(int32)) {
	first, ok := x.one[key]
	if !ok {
		return
	}
	fn(first)
	for _, i := range x.more[key] {
		fn(i)
	}
}

func instantMS(s string) int64 {
	t, _, _, err := fhir.ParseDateTime(s)
	if err != nil {
		return 0
	}
	return t.UnixMilli()
}

// associated writes the Provenance of the resources the job exports
// (includeAssociatedData). It reads the Provenance the job may see (its
// tenants, the token's Provenance scope filters, as of the snapshot) and
// indexes them by their targets of exported types; then it walks the job's
// own selection of the targeted types, the same scans the other units write,
// to learn which targets are exported; last it writes the chosen Provenance.
// A Provenance the export holds anyway (Provenance in _type, or in a
// patient's compartment) is not written again. The unit reads the selection
// anew rather than waiting on the other units, so it runs beside them.
func (s *Service) associated(ctx context.Context, job *kiln.Job, u *kiln.Unit, w *partWriter) error {
	req := &job.Request
	latest := slices.Contains(req.IncludeAssociatedData, LatestProvenance)
	relevant := slices.Contains(req.IncludeAssociatedData, RelevantProvenance)
	// Provenance is found by target whenever it was recorded: the _since and
	// _until window picks the targets, not their Provenance.
	pq := baseQuery(job)
	pq.Type, pq.Since, pq.Until = "Provenance", time.Time{}, time.Time{}
	refOpts := s.refs(job)
	var provs []provenance
	byID := map[string]int32{}
	targets := targetIndex{one: map[string]int32{}, more: map[string][]int32{}}
	targeted := map[string]bool{}
	// Rough bytes held per Provenance and per target key: the strings plus
	// map and slice overhead. The index is the one part of an export whose
	// memory follows the data, so it has a budget of its own.
	var held int64
	const perEntry = 64
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
		i := int32(len(provs))
		provs = append(provs, provenance{id: p.ID, recorded: instantMS(p.Recorded), updated: instantMS(p.Meta.LastUpdated)})
		byID[p.ID] = i
		held += int64(2*len(p.ID)) + 2*perEntry
		for _, t := range p.Target {
			ref, ok := fhir.ParseReference(t.Reference, refOpts)
			if !ok || !slices.Contains(u.Types, ref.Type) {
				continue
			}
			key := ref.Type + "/" + ref.ID
			targets.add(key, i)
			targeted[ref.Type] = true
			held += int64(len(key)) + perEntry
		}
		if held > s.cfg.AssociatedIndexBytes {
			return kiln.Errorf(kiln.EINVALID, "includeAssociatedData: indexing this export's Provenance by target needs more than %d MiB (the server's limit): narrow the export with _type, _typeFilter, patient or a smaller Group", s.cfg.AssociatedIndexBytes>>20)
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
			best := int32(-1)
			targets.each(typ+"/"+r.ID, func(i int32) {
				if relevant {
					chosen[i] = true
				}
				if best < 0 || provs[i].newer(provs[best]) {
					best = i
				}
			})
			if latest && best >= 0 {
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
	if !req.Reads("Provenance") {
		req.Warnings = append(req.Warnings, kiln.Issue{Expression: "includeAssociatedData",
			Message: fmt.Sprintf("no Provenance exported for includeAssociatedData=%s: the token's scopes do not grant Provenance", strings.Join(req.IncludeAssociatedData, ","))})
		return false
	}
	return true
}

// allProvenance reports whether the job's own Provenance output already
// holds every Provenance it may see (a system export of Provenance with no
// window or filter on it): then the Provenance pass could add nothing.
func allProvenance(req *kiln.ExportRequest, exported []string) bool {
	return req.Level == kiln.LevelSystem && slices.Contains(exported, "Provenance") && req.Since == nil && req.Until == nil &&
		len(req.TypeFilters["Provenance"]) == 0 && len(req.ScopeFilters["Provenance"]) == 0
}
