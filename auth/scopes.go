// Package auth is Kiln's access control: JWT bearer verification (Kiln's own
// tokens, JWKS, or a shared secret for development), SMART v1/v2 and access/
// scopes, and the SMART Backend Services token endpoint.
package auth

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// Principal is who a request acts for and what it may touch.
type Principal struct {
	// Name identifies the principal (the token's sub, or a configured claim)
	// and Issuer the token's iss: export jobs belong to both (Owner).
	Name   string
	Issuer string
	Scopes []string
	// Patient is true when any patient/ scope was granted: such tokens may not export.
	Patient bool
	// PatientContext is the patient a patient/ scope is bound to (the SMART
	// launch context's patient claim). patient/ scopes grant only resources
	// in that patient's compartment, and nothing without a context.
	PatientContext string
	// Refs are how references to this server are recognised (its base
	// URLs), for the compartment checks of patient/ scopes: the server
	// sets them per request.
	Refs fhir.Options
	// Resource types readable by id (Read["*"] for all: SMART v2 r),
	// searchable (s) and writable, by system/ and user/ scopes.
	Read, Search, Write map[string]bool
	// patientRead, patientSearch and patientWrite are the types of patient/ scopes.
	patientRead, patientSearch, patientWrite map[string]bool
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
	// patient: a patient/ scope's filter, which also needs the compartment.
	patient bool
	// perms are the read permissions it grants (PermRead, PermSearch).
	perms Perm
}

// Anonymous is the principal when authentication is off: it may do everything.
func Anonymous() *Principal {
	return &Principal{Name: "anonymous", Read: map[string]bool{"*": true}, Search: map[string]bool{"*": true}, Write: map[string]bool{"*": true}, AccessAll: true, HasAccessScope: true}
}

// Perm is a set of SMART v2 permissions (the letters of "cruds").
type Perm uint8

const (
	PermCreate Perm = 1 << iota
	PermRead
	PermUpdate
	PermDelete
	PermSearch

	permReads  = PermRead | PermSearch
	permWrites = PermCreate | PermUpdate | PermDelete
)

// Scope is one parsed SMART scope (patient|user|system/Type.perms?query) or
// Kiln's tenant scope (access/code.perms).
type Scope struct {
	Context string // patient, user, system or access
	Target  string // a resource type, a tenant code, or *
	Perms   Perm
	Query   string // a SMART v2 query filter, without "?"; empty for none
}

// ParseScope reads one scope. SMART v1 permissions (read, write, *) and v2
// letters (c, r, u, d, s in that order, each at most once) give the same
// grants: .read = .rs, .write = .cud, .* = .cruds. Scopes that are not
// resource or access scopes (openid, launch, fhirUser, …) are an error: they
// grant nothing here.
func ParseScope(s string) (Scope, error) {
	ctx, rest, ok := strings.Cut(s, "/")
	if !ok {
		return Scope{}, fmt.Errorf("scope %q is not of the form context/Type.permissions", s)
	}
	switch ctx {
	case "patient", "user", "system", "access":
	default:
		return Scope{}, fmt.Errorf("scope %q: context %q is not patient, user, system or access", s, ctx)
	}
	target, perm, ok := strings.Cut(rest, ".")
	if !ok || target == "" {
		return Scope{}, fmt.Errorf("scope %q names no permissions", s)
	}
	perm, query, filtered := strings.Cut(perm, "?")
	sc := Scope{Context: ctx, Target: target, Query: query}
	if target != "*" && ctx != "access" && !fhir.ValidID(target) {
		return Scope{}, fmt.Errorf("scope %q: %q is not a resource type", s, target)
	}
	if filtered && query == "" {
		return Scope{}, fmt.Errorf("scope %q has an empty query filter", s)
	}
	switch perm {
	case "read":
		sc.Perms = permReads
	case "write":
		sc.Perms = permWrites
	case "*":
		sc.Perms = permReads | permWrites
	default:
		last := -1
		for _, c := range perm {
			i := strings.IndexRune("cruds", c)
			if i <= last {
				return Scope{}, fmt.Errorf("scope %q: permissions %q are not v1 read/write/* nor v2 letters in the order cruds", s, perm)
			}
			last = i
			sc.Perms |= 1 << i
		}
		if sc.Perms == 0 {
			return Scope{}, fmt.Errorf("scope %q names no permissions", s)
		}
	}
	return sc, nil
}

// Covers reports whether holding s grants everything o asks: the same
// context, the same target (or * for s), o's permissions among s's, and s's
// query filter (if any) the same as o's. An unfiltered scope covers filtered
// ones of the same type.
func (s Scope) Covers(o Scope) bool {
	return s.Context == o.Context &&
		(s.Target == "*" || s.Target == o.Target) &&
		o.Perms&^s.Perms == 0 &&
		(s.Query == "" || s.Query == o.Query)
}

// Grant decides a token request: the requested scopes that a registered one
// covers are granted, in the requested spelling (narrower than registered is
// fine); the others are dropped and returned, so that the caller can report
// them (the granted scope string tells the client). It is an error when no
// scope was requested (SMART Backend Services requires one) or none could be
// granted.
func Grant(registered, requested string) (granted string, dropped []string, err error) {
	var reg []Scope
	for _, f := range strings.Fields(registered) {
		if sc, err := ParseScope(f); err == nil {
			reg = append(reg, sc)
		}
	}
	want := strings.Fields(requested)
	if len(want) == 0 {
		return "", nil, errors.New("scope is required: name the scopes the token should carry, for example system/*.rs")
	}
	var out []string
	for _, f := range want {
		sc, err := ParseScope(f)
		ok := err == nil && slices.ContainsFunc(reg, func(r Scope) bool { return r.Covers(sc) })
		if ok && !slices.Contains(out, f) {
			out = append(out, f)
		} else if !ok {
			dropped = append(dropped, f)
		}
	}
	if len(out) == 0 {
		return "", dropped, fmt.Errorf("none of the requested scopes is granted to this client (registered: %s)", registered)
	}
	return strings.Join(out, " "), dropped, nil
}

// ParseScopes reads a space-separated scope string into a principal (see
// ParseScope for the spellings). SMART v2 query filters on reads
// (system/Observation.rs?category=laboratory) grant only matching resources;
// several filters for a type are ORed, and an unfiltered read scope for the
// type wins. access/<code> scopes name tenants (access/*: every tenant). A
// filter on writes, on *, or one Kiln cannot evaluate grants nothing; other
// scopes (openid, launch, …) are kept but grant nothing.
func ParseScopes(name, scope string) *Principal {
	p := &Principal{Name: name, Read: map[string]bool{}, Search: map[string]bool{}, Write: map[string]bool{},
		patientRead: map[string]bool{}, patientSearch: map[string]bool{}, patientWrite: map[string]bool{}}
	for _, s := range strings.Fields(scope) {
		p.Scopes = append(p.Scopes, s)
		sc, err := ParseScope(s)
		if err != nil {
			continue
		}
		read, write := sc.Perms&permReads != 0, sc.Perms&permWrites != 0
		if sc.Query != "" {
			if !read || write || sc.Target == "*" || sc.Context == "access" {
				continue
			}
			q, err := fhir.ParseTypeFilter(sc.Target + "?" + sc.Query)
			if err != nil {
				continue
			}
			if sc.Context == "patient" {
				p.Patient = true
			}
			if p.filters == nil {
				p.filters = map[string][]scopeFilter{}
			}
			p.filters[sc.Target] = append(p.filters[sc.Target], scopeFilter{raw: sc.Query, q: q, patient: sc.Context == "patient", perms: sc.Perms & permReads})
			continue
		}
		switch sc.Context {
		case "access":
			p.HasAccessScope = true
			if sc.Target == "*" && read {
				p.AccessAll = true
			}
			if read && sc.Target != "*" {
				p.Access = append(p.Access, sc.Target)
			}
			if write {
				p.AccessWrite = append(p.AccessWrite, sc.Target)
			}
		case "patient":
			p.Patient = true
			if sc.Perms&PermRead != 0 {
				p.patientRead[sc.Target] = true
			}
			if sc.Perms&PermSearch != 0 {
				p.patientSearch[sc.Target] = true
			}
			if write {
				p.patientWrite[sc.Target] = true
			}
		default:
			if sc.Perms&PermRead != 0 {
				p.Read[sc.Target] = true
			}
			if sc.Perms&PermSearch != 0 {
				p.Search[sc.Target] = true
			}
			if write {
				p.Write[sc.Target] = true
			}
		}
	}
	return p
}

// Under applies the server's tenancy to a principal read from a token: with
// TenancyNone, a token that names no tenant reads and writes records of every
// tenant (its resource scopes still apply); with TenancyAccessTags it names
// none and so may touch none.
func (p *Principal) Under(t kiln.Tenancy) *Principal {
	if t == kiln.TenancyNone && !p.HasAccessScope {
		p.AccessAll = true
		p.AccessWrite = []string{"*"}
	}
	return p
}

// ReadsNoTenant reports whether p may read no record at all for want of an
// access/ scope (only under TenancyAccessTags, where Under grants nothing).
func (p *Principal) ReadsNoTenant() bool {
	return !p.AccessAll && len(p.Access) == 0
}

// Action is what a read grant is asked for: SMART v2 tells reading a
// resource by id (r) from searching (s); v1 .read grants both.
type Action uint8

const (
	// ActRead is read, vread, history and export (r).
	ActRead Action = iota
	// ActSearch is search and $viewdefinition-run (s).
	ActSearch
)

// grants are the system/ and user/ scopes' types for act, and
// patientGrants the patient/ scopes'.
func (p *Principal) grants(act Action) map[string]bool {
	if act == ActSearch {
		return p.Search
	}
	return p.Read
}

func (p *Principal) patientGrants(act Action) map[string]bool {
	if act == ActSearch {
		return p.patientSearch
	}
	return p.patientRead
}

// Can reports whether resources of typ may be read (act ActRead) or
// searched (ActSearch) — some of them, when the type is Restricted.
func (p *Principal) Can(act Action, typ string) bool {
	if g := p.grants(act); g["*"] || g[typ] {
		return true
	}
	for _, f := range p.filters[typ] {
		if f.perms&actPerm(act) != 0 && (!f.patient || p.PatientContext != "") {
			return true
		}
	}
	pg := p.patientGrants(act)
	return p.PatientContext != "" && (pg["*"] || pg[typ])
}

func actPerm(act Action) Perm {
	if act == ActSearch {
		return PermSearch
	}
	return PermRead
}

// CanRead reports whether resources of typ may be read by id (r).
func (p *Principal) CanRead(typ string) bool { return p.Can(ActRead, typ) }

// CanSearch reports whether resources of typ may be searched (s).
func (p *Principal) CanSearch(typ string) bool { return p.Can(ActSearch, typ) }

// Restricted reports whether only some resources of typ may be read or
// searched (by query-filtered or patient/ scopes): each must then pass Matches.
func (p *Principal) Restricted(act Action, typ string) bool {
	g := p.grants(act)
	return !g["*"] && !g[typ]
}

// PatientOnly reports whether every grant to act on typ is a patient/
// scope, and so limited to the compartment of the patient it returns.
func (p *Principal) PatientOnly(act Action, typ string) (string, bool) {
	if !p.Restricted(act, typ) {
		return "", false
	}
	for _, f := range p.filters[typ] {
		if f.perms&actPerm(act) != 0 && !f.patient {
			return "", false
		}
	}
	return p.PatientContext, true
}

// Filters returns the queries of the system/ filtered read scopes that
// limit reads of typ (Type?query without "Type?"), or nil when typ is
// readable unfiltered: what an export applies. (A token with patient/
// scopes may not export; REST goes through Matches.)
func (p *Principal) Filters(typ string) []string {
	if !p.Restricted(ActRead, typ) {
		return nil
	}
	var out []string
	for _, f := range p.filters[typ] {
		if !f.patient && f.perms&PermRead != 0 {
			out = append(out, f.raw)
		}
	}
	return out
}

// FilteredTypes lists the types readable only through filtered scopes, sorted.
func (p *Principal) FilteredTypes() []string {
	var out []string
	for typ := range p.filters {
		if len(p.Filters(typ)) > 0 {
			out = append(out, typ)
		}
	}
	slices.Sort(out)
	return out
}

// Matches reports whether a stored resource of typ passes the principal's
// grants to act on typ: an unrestricted scope, a filtered scope whose query
// it matches, or a patient/ scope (filtered or not) when it is in the
// compartment of the token's patient.
func (p *Principal) Matches(act Action, typ string, body []byte) bool {
	if !p.Restricted(act, typ) {
		return true
	}
	var fs []scopeFilter
	for _, f := range p.filters[typ] {
		if f.perms&actPerm(act) != 0 {
			fs = append(fs, f)
		}
	}
	pg := p.patientGrants(act)
	patientWide := p.PatientContext != "" && (pg["*"] || pg[typ])
	if len(fs) == 0 && !patientWide {
		return false
	}
	m, err := fhir.DecodeJSON(body)
	if err != nil {
		return false
	}
	inCompartment := func() bool { return p.PatientContext != "" && InCompartment(typ, m, p.PatientContext, p.Refs) }
	if patientWide && inCompartment() {
		return true
	}
	for _, f := range fs {
		if f.q.Match(m) && (!f.patient || inCompartment()) {
			return true
		}
	}
	return false
}

// InCompartment reports whether a decoded resource of typ is in the Patient
// compartment of patient (the R4 CompartmentDefinition; a Patient is in its
// own): relative references, and absolute ones under refs' bases, as the
// store's compartment index counts them.
func InCompartment(typ string, m map[string]any, patient string, refs fhir.Options) bool {
	id, _ := m["id"].(string)
	return slices.Contains(fhir.Extract(typ, id, m, refs).Patients, patient)
}

// OnlyInCompartment reports whether a decoded resource of typ is in the
// compartment of patient and of no other patient: what a patient/ write
// scope may create or change (a record naming the patient only as, say,
// performer beside another subject is that other patient's too).
func OnlyInCompartment(typ string, m map[string]any, patient string, refs fhir.Options) bool {
	id, _ := m["id"].(string)
	ps := fhir.Extract(typ, id, m, refs).Patients
	for _, p := range ps {
		if p != patient {
			return false
		}
	}
	return len(ps) > 0
}

// CanWrite reports whether resources of typ may be written (only some,
// when WritesOnlyPatient).
func (p *Principal) CanWrite(typ string) bool {
	return p.Write["*"] || p.Write[typ] || p.PatientContext != "" && (p.patientWrite["*"] || p.patientWrite[typ])
}

// WritesOnlyPatient reports whether the only grant to write typ is a
// patient/ scope: then the record, before and after the change, must be in
// the compartment of the patient it returns and of no other (OnlyInCompartment).
func (p *Principal) WritesOnlyPatient(typ string) (string, bool) {
	if p.Write["*"] || p.Write[typ] {
		return "", false
	}
	return p.PatientContext, true
}

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

// Owner is who export jobs belong to: the subject as its issuer names it,
// so that another trusted issuer's token with the same sub owns nothing.
func (p *Principal) Owner() string {
	if p.Issuer == "" {
		return p.Name
	}
	return p.Issuer + "#" + p.Name
}

// Holds reports whether p holds every read an export with grant g was
// given: the status, manifest, files and cancel of an export need it, so a
// token of the same subject with fewer scopes (or none) reaches nothing of it.
func (p *Principal) Holds(g kiln.ExportGrant) bool {
	if g.ReadTypes == nil && !p.Read["*"] {
		return false
	}
	for _, t := range g.ReadTypes {
		if !p.CanRead(t) {
			return false
		}
		if p.Restricted(ActRead, t) {
			// p reads t only through filters: the export must be filtered
			// by some of them, and by nothing p lacks.
			mine := p.Filters(t)
			if len(g.ScopeFilters[t]) == 0 {
				return false
			}
			for _, f := range g.ScopeFilters[t] {
				if !slices.Contains(mine, f) {
					return false
				}
			}
		}
	}
	codes := p.AccessCodes()
	if codes == nil {
		return true
	}
	if g.Tenants == nil {
		return false
	}
	for _, c := range g.Tenants {
		if !slices.Contains(codes, c) {
			return false
		}
	}
	return true
}

// Forbidden is the error for a missing permission.
func Forbidden(format string, args ...any) error {
	return kiln.Errorf(kiln.EFORBIDDEN, format, args...)
}
