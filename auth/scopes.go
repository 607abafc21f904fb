// Package auth is Kiln's access control: JWT bearer verification (Kiln's own
// tokens, JWKS, or a shared secret for development), SMART v1/v2 and access/
// scopes, and the SMART Backend Services token endpoint.
package auth

import (
	"slices"
	"strings"

	"github.com/kiln-fhir/kiln"
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
}

// Anonymous is the principal when authentication is off: it may do everything.
func Anonymous() *Principal {
	return &Principal{Name: "anonymous", Read: map[string]bool{"*": true}, Write: map[string]bool{"*": true}, AccessAll: true, HasAccessScope: true}
}

// ParseScopes reads a space-separated scope string. Understood: SMART v1
// (user/Observation.read, system/*.read, patient/*.write, user/*.*), SMART v2
// (system/Observation.rs, .r, .s, .cruds, …), and access/<code>.read|.write|.*
// (access/*.read: every tenant). Others (openid, launch, …) are kept but grant nothing.
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
		// SMART v2 query filters (system/Observation.rs?category=…) are not honoured: such a scope grants nothing.
		if strings.Contains(perm, "?") {
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

// CanRead reports whether resources of typ may be read.
func (p *Principal) CanRead(typ string) bool { return p.Read["*"] || p.Read[typ] }

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
		if p.Read[t] {
			out = append(out, t)
		}
	}
	return out
}

// Forbidden is the error for a missing permission.
func Forbidden(format string, args ...any) error {
	return kiln.Errorf(kiln.EFORBIDDEN, format, args...)
}
