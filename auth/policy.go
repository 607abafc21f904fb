package auth

import (
	"slices"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// The access policy: every read, vread, history entry, search hit, view
// row, write, delete and stored-view change asks one of these, with the
// resource version actually returned or changed. (Exports carry the same
// decisions in the job's kiln.ExportGrant, which the engine and the stores
// apply to every exported version.)

// CheckRead checks the type scope for a read (SMART v2: r).
func (p *Principal) CheckRead(typ string) error {
	if !p.CanRead(typ) {
		return Forbidden("the token's scopes do not allow reading %s (SMART v2: r)", typ)
	}
	return nil
}

// CheckSearch checks the type scope for a search (SMART v2: s).
func (p *Principal) CheckSearch(typ string) error {
	if !p.CanSearch(typ) {
		return Forbidden("the token's scopes do not allow searching %s (SMART v2: s)", typ)
	}
	return nil
}

// Readable reports whether p may read (act ActRead) or find by search
// (ActSearch) a stored resource of typ: its access tags, and the query
// filters and patient context of p's scopes for typ.
func (p *Principal) Readable(act Action, typ string, body []byte) bool {
	return p.Visible(body) && p.Matches(act, typ, body)
}

// Visible reports whether p may see a stored resource body (by its access tags).
func (p *Principal) Visible(body []byte) bool {
	if p.AccessAll {
		return true
	}
	return p.CanSee(kiln.AccessCodesOf(body))
}

// ReadableHistory keeps the versions (newest first) that p may read: each
// version with a body is judged by its own tags and p's filters, and a
// deletion by the version it deleted. A record re-tagged between tenants
// shows each tenant only its own versions.
func (p *Principal) ReadableHistory(typ string, versions []kiln.Resource) []kiln.Resource {
	out := versions[:0:0]
	for i, v := range versions {
		if !v.Deleted {
			if p.Readable(ActRead, typ, v.Body) {
				out = append(out, v)
			}
			continue
		}
		for _, older := range versions[i+1:] {
			if !older.Deleted {
				if p.Readable(ActRead, typ, older.Body) {
					out = append(out, v)
				}
				break
			}
		}
	}
	return out
}

// TenantBound reports whether p writes under a tenant limit: it holds
// access/ scopes, none of them for every tenant.
func (p *Principal) TenantBound() bool {
	return p.HasAccessScope && !slices.Contains(p.AccessWrite, "*")
}

// onlyInCompartment reports whether a body of typ is in the compartment of
// patient and of no other patient.
func onlyInCompartment(typ string, body []byte, patient string, refs fhir.Options) bool {
	m, err := fhir.DecodeJSON(body)
	return err == nil && OnlyInCompartment(typ, m, patient, refs)
}

// CheckWrite decides a write or delete: the type scope, the access codes
// the new version carries, and that the record as it stands — before
// returns its last version with a body (nil for a new record), so a deleted
// record keeps its tenant — is p's to change. The checks that need no
// stored data come first. A record p may not see answers 404, whether it
// is live, deleted or another tenant's, so a write reveals nothing a read
// would not.
func (p *Principal) CheckWrite(w *kiln.Write, before func() ([]byte, error)) error {
	if !p.CanWrite(w.Type) {
		return Forbidden("the token's scopes do not allow writing %s", w.Type)
	}
	patient, patientOnly := p.WritesOnlyPatient(w.Type)
	if patientOnly && w.Kind != kiln.Delete && !onlyInCompartment(w.Type, w.Body, patient, p.Refs) {
		return Forbidden("the token's patient/ scopes allow writing only resources in the compartment of Patient/%s and of no other patient", patient)
	}
	if w.Kind != kiln.Delete {
		if !p.CanTag(w.AccessCodes) {
			return Forbidden("the token may not write records tagged %v (%s)", w.AccessCodes, kiln.AccessSystem)
		}
		if len(w.AccessCodes) == 0 && p.TenantBound() {
			return kiln.Invalid("meta.security", "a record written with a tenant-limited token must carry one of its access codes (%s)", kiln.AccessSystem)
		}
	}
	prior, err := before()
	if err != nil {
		return err
	}
	if prior == nil {
		return nil // a new record
	}
	if !p.Visible(prior) || patientOnly && !onlyInCompartment(w.Type, prior, patient, p.Refs) {
		return kiln.Errorf(kiln.ENOTFOUND, "%s/%s is not known", w.Type, w.ID)
	}
	if codes := kiln.AccessCodesOf(prior); !p.CanTag(codes) {
		return Forbidden("the token may not change records tagged %v (%s): it needs write access to each", codes, kiln.AccessSystem)
	}
	return nil
}

// CheckWriteViews decides a change to the stored ViewDefinitions (type
// viewType): a system/ or user/ write scope for it (a patient/ scope is
// about one patient's records, and a view is every export's) and every
// tenant's write access (access/*.write, or a token that names no tenant
// under --tenancy none) — a stored view is shared by every tenant, so one
// tenant must not change what another's exports compute.
func (p *Principal) CheckWriteViews(viewType string) error {
	if !p.Write["*"] && !p.Write[viewType] {
		return Forbidden("the token's scopes do not allow writing %s (a system/ or user/ write scope)", viewType)
	}
	if !slices.Contains(p.AccessWrite, "*") {
		return Forbidden("stored %ss are shared by every tenant: changing them needs access/*.write", viewType)
	}
	return nil
}
