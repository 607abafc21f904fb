package fhir

import (
	"slices"
	"strings"

	"github.com/kiln-fhir/kiln"
)

// Refs is what the indexes need to know about one resource.
type Refs struct {
	// Patients whose compartment holds the resource (a Patient is in its own).
	Patients []string
	// Supporting lists references from a compartment resource to resources
	// outside the compartment.
	Supporting []kiln.Ref
	// PatientRefs lists patients referenced by a resource outside the compartment.
	PatientRefs []string
	AccessCodes []string
}

// Extract reads compartment membership, references and access codes from a
// decoded resource of type typ with the given id. Only references to this
// server count: relative ones (Patient/1, Patient/1/_history/2) and absolute
// ones under one of opt.Bases; contained (#x), urn: and foreign URLs do not.
func Extract(typ, id string, m map[string]any, opt Options) Refs {
	d := R4()
	var r Refs
	inComp := d.InCompartment(typ)
	if typ == "Patient" {
		r.Patients = append(r.Patients, id)
	}
	for _, path := range d.compartmentPaths[typ] {
		walkPath(m, path, func(v any) {
			ref, ok := referenceOf(v, opt)
			if ok && ref.Type == "Patient" {
				r.Patients = append(r.Patients, ref.ID)
			}
		})
	}
	walkRefs(m, true, func(s string) {
		ref, ok := ParseReference(s, opt)
		if !ok {
			return
		}
		switch {
		case inComp && !d.InCompartment(ref.Type):
			r.Supporting = append(r.Supporting, ref)
		case !inComp && ref.Type == "Patient":
			r.PatientRefs = append(r.PatientRefs, ref.ID)
		}
	})
	if meta, ok := m["meta"].(map[string]any); ok {
		if sec, ok := meta["security"].([]any); ok {
			for _, c := range sec {
				cm, _ := c.(map[string]any)
				if sys, _ := cm["system"].(string); sys == kiln.AccessSystem {
					if code, _ := cm["code"].(string); code != "" {
						r.AccessCodes = append(r.AccessCodes, code)
					}
				}
			}
		}
	}
	r.Patients = uniq(r.Patients)
	r.PatientRefs = uniq(r.PatientRefs)
	r.AccessCodes = uniq(r.AccessCodes)
	r.Supporting = uniqRefs(r.Supporting)
	return r
}

// walkPath calls fn for every value at path below v, flattening arrays.
func walkPath(v any, path []string, fn func(any)) {
	switch x := v.(type) {
	case []any:
		for _, item := range x {
			walkPath(item, path, fn)
		}
	case map[string]any:
		if len(path) == 0 {
			fn(x)
			return
		}
		if next, ok := x[path[0]]; ok {
			walkPath(next, path[1:], fn)
		}
	}
}

// walkRefs calls fn with every Reference.reference string in v, not descending
// into contained resources (their references are the container's business only
// through the container's own elements).
func walkRefs(v any, top bool, fn func(string)) {
	switch x := v.(type) {
	case []any:
		for _, item := range x {
			walkRefs(item, false, fn)
		}
	case map[string]any:
		for k, val := range x {
			if k == "reference" {
				if s, ok := val.(string); ok {
					fn(s)
				}
				continue
			}
			if top && k == "contained" {
				continue
			}
			if _, ok := val.(string); ok {
				continue
			}
			walkRefs(val, false, fn)
		}
	}
}

func referenceOf(v any, opt Options) (kiln.Ref, bool) {
	m, ok := v.(map[string]any)
	if !ok {
		return kiln.Ref{}, false
	}
	s, _ := m["reference"].(string)
	return ParseReference(s, opt)
}

// ParseReference reads a literal reference to this server: Type/id,
// Type/id/_history/v, or either under one of opt.Bases.
func ParseReference(s string, opt Options) (kiln.Ref, bool) {
	if s == "" || s[0] == '#' {
		return kiln.Ref{}, false
	}
	if strings.Contains(s, "://") {
		matched := false
		for _, b := range opt.Bases {
			b = strings.TrimSuffix(b, "/")
			if strings.HasPrefix(s, b+"/") {
				s, matched = s[len(b)+1:], true
				break
			}
		}
		if !matched {
			return kiln.Ref{}, false
		}
	}
	typ, rest, ok := strings.Cut(s, "/")
	if !ok {
		return kiln.Ref{}, false
	}
	id, hist, _ := strings.Cut(rest, "/")
	if hist != "" && !strings.HasPrefix(hist, "_history/") {
		return kiln.Ref{}, false
	}
	if !R4().IsResourceType(typ) || !ValidID(id) {
		return kiln.Ref{}, false
	}
	return kiln.Ref{Type: typ, ID: id}, true
}

func uniq(s []string) []string {
	slices.Sort(s)
	return slices.Compact(s)
}

func uniqRefs(s []kiln.Ref) []kiln.Ref {
	slices.SortFunc(s, func(a, b kiln.Ref) int {
		if c := strings.Compare(a.Type, b.Type); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return slices.Compact(s)
}
