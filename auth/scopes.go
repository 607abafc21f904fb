// Package auth is Kiln's access control: JWT bearer verification (Kiln's own
// tokens, JWKS, or a shared secret for development), SMART v1/v2 and access/
// scopes, and the SMART Backend Services token endpoint.
package auth

import (
	"maps"
	"slices"
	"strings"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// Principal is who a request acts for and what it may touch.
type Principal struct {
	// Name identifies the principal (the token's sub, or a configured claim);
	// export jobs belong to it.
	Name   string
	Scopes []string
	// Patient is true when any patient/ scope was granted: such tokens may not export.
	Patient bool
	// Resource types readable (Read["*"] for all) and writable.
	Read, Write map[string]bool
	// AccessAll: every tenant (access/*.read, or no authentication).
	AccessAll bool
	// Access are the tenant codes readable; AccessWrite those writable.
	Access, AccessWrite []string
	// HasAccessScope is false when the token carries no access/ scope at all.
	HasAccessScope bool
	// filters holds, per type readable only through SMART v2 query-filtered
	// scopes (system/Observation.rs?category=laboratory), those filters: a
	// resource of the type is readable when it matches one of them.
	filters map[string][]scopeFilter
}

type scopeFilter struct {
	raw string
	q   *fhir.Query
}

// Anonymous is the principal when authentication is off: it may do everything.
func Anonymous() *Principal {
	return &Principal{Name: "anonymous", Read: map[string]bool{"*": true}, Write: map[string]bool{"*": true}, AccessAll: true, HasAccessScope: true}
}

// ParseScopes reads a space-separated scope string. Understood: SMART v1
// (user/Observation.read, system/*.read, patient/*.write, user/*.*), SMART v2
// (system/Observation.rs, .r, .s, .cruds, …), SMART v2 query filters on
// reads (system/Observation.rs?category=laboratory: only matching
// Observations; several filters for a type are ORed, and an unfiltered read
// scope for the type wins), and access/<code>.read|.write|.* (access/*.read:
// every tenant). A filter on writes or on *, or one Kiln cannot evaluate,
// grants nothing. Others (openid, launch, …) are kept but grant nothing.
func ParseScopes(name, scope string) *Principal {
	p := &Principal{Name: name, Read: map[string]bool{}, Write: map[string]bool{}}
	for _, s := range strings.Fields(scope) {
		p.Scopes = append(p.Scopes, s)
		ctx, rest, ok := strings.Cut(s, "/")
		if !ok {
			continue
		}
		target, perm, ok := strings.Cut(rest, ".")
		if !ok {
			continue
		}
		if perm, query, filtered := strings.Cut(perm, "?"); filtered {
			read, write := perms(perm)
			if !read || write || target == "*" || ctx == "access" {
				continue
			}
			q, err := fhir.ParseTypeFilter(target + "?" + query)
			if err != nil {
				continue
			}
			if ctx == "patient" {
				p.Patient = true
			}
			if p.filters == nil {
				p.filters = map[string][]scopeFilter{}
			}
			p.filters[target] = append(p.filters[target], scopeFilter{raw: query, q: q})
			continue
		}
		read, write := perms(perm)
		switch ctx {
		case "access":
			p.HasAccessScope = true
			if target == "*" && read {
				p.AccessAll = true
			}
			if read && target != "*" {
				p.Access = append(p.Access, target)
			}
			if write {
				p.AccessWrite = append(p.AccessWrite, target)
			}
		case "patient", "user", "system":
			if ctx == "patient" {
				p.Patient = true
			}
			if read {
				p.Read[target] = true
			}
			if write {
				p.Write[target] = true
			}
		}
	}
	for typ := range p.filters {
		if p.Read["*"] || p.Read[typ] {
			delete(p.filters, typ) // an unfiltered scope already grants the whole type
		}
	}
	return p
}

// perms reads a SMART permission: v1 read/write/*, v2 letters cruds.
func perms(p string) (read, write bool) {
	switch p {
	case "read":
		return true, false
	case "write":
		return false, true
	case "*":
		return true, true
	}
	if p == "" || strings.Trim(p, "cruds") != "" {
		return false, false
	}
	return strings.ContainsAny(p, "rs"), strings.ContainsAny(p, "cud")
}

// CanRead reports whether resources of typ may be read (some of them, when
// the type has Filters).
func (p *Principal) CanRead(typ string) bool {
	return p.Read["*"] || p.Read[typ] || len(p.filters[typ]) > 0
}

// Filters returns the queries of the filtered scopes that limit reads of typ
// (Type?query without "Type?"), or nil when typ is readable unfiltered.
func (p *Principal) Filters(typ string) []string {
	var out []string
	for _, f := range p.filters[typ] {
		out = append(out, f.raw)
	}
	return out
}

// FilteredTypes lists the types readable only through filtered scopes, sorted.
func (p *Principal) FilteredTypes() []string {
	return slices.Sorted(maps.Keys(p.filters))
}

// Matches reports whether a stored resource of typ passes the principal's
// scope filters for typ (always, when typ has none).
func (p *Principal) Matches(typ string, body []byte) bool {
	fs := p.filters[typ]
	if len(fs) == 0 {
		return true
	}
	m, err := fhir.DecodeJSON(body)
	if err != nil {
		return false
	}
	for _, f := range fs {
		if f.q.Match(m) {
			return true
		}
	}
	return false
}

// CanWrite reports whether resources of typ may be written.
func (p *Principal) CanWrite(typ string) bool { return p.Write["*"] || p.Write[typ] }

// AccessCodes is the tenant filter for reads: nil means every tenant.
func (p *Principal) AccessCodes() []string {
	if p.AccessAll {
		return nil
	}
	if p.Access == nil {
		return []string{}
	}
	return p.Access
}

// CanSee reports whether a record tagged with codes is visible.
func (p *Principal) CanSee(codes []string) bool {
	if p.AccessAll {
		return true
	}
	for _, c := range codes {
		if slices.Contains(p.Access, c) {
			return true
		}
	}
	return false
}

// CanTag reports whether the principal may write a record tagged with codes.
func (p *Principal) CanTag(codes []string) bool {
	if slices.Contains(p.AccessWrite, "*") {
		return true
	}
	for _, c := range codes {
		if !slices.Contains(p.AccessWrite, c) {
			return false
		}
	}
	return true
}

// ReadTypes lists the readable types of all, or nil when every type is readable.
func (p *Principal) ReadTypes(all []string) []string {
	if p.Read["*"] {
		return nil
	}
	out := []string{}
	for _, t := range all {
		if p.CanRead(t) {
			out = append(out, t)
		}
	}
	return out
}

// Forbidden is the error for a missing permission.
func Forbidden(format string, args ...any) error {
	return kiln.Errorf(kiln.EFORBIDDEN, format, args...)
}
