package fhir

import (
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"unicode"
)

// step is one move of a compiled element path.
type step struct {
	field  string // element name ("" for a filter-only step)
	ofType string // choice narrowing: value + Quantity → valueQuantity
	// refType keeps references to that resource type only (where(resolve() is T)).
	refType string
	// whereField/whereValue keep items whose child field equals a value (where(system='phone')).
	whereField, whereValue string
}

// Param is a search parameter compiled for one resource type.
type Param struct {
	Code    string
	Type    string // token, reference, date, string, quantity, number, uri
	paths   [][]step
	Targets []string
}

var (
	wherePattern = regexp.MustCompile(`^where\((\w+)\s*=\s*'([^']*)'\)$`)
	resolveIs    = regexp.MustCompile(`^where\(resolve\(\) is (\w+)\)$`)
	ofTypeStep   = regexp.MustCompile(`^ofType\((\w+)\)$`)
	asPattern    = regexp.MustCompile(`^(.*) as (\w+)$`)
)

// compileExpr turns one union member of a FHIRPath expression into steps, or
// false when it uses FHIRPath Kiln's evaluator does not support.
func compileExpr(typ, e string) ([]step, bool) {
	e = strings.TrimSpace(e)
	// (X).rest → X.rest ; (X) → X
	for strings.HasPrefix(e, "(") {
		depth, end := 0, -1
		for i, c := range e {
			if c == '(' {
				depth++
			} else if c == ')' {
				depth--
				if depth == 0 {
					end = i
					break
				}
			}
		}
		if end < 0 {
			return nil, false
		}
		e = e[1:end] + e[end+1:]
	}
	if m := asPattern.FindStringSubmatch(e); m != nil {
		e = m[1] + ".ofType(" + m[2] + ")"
	}
	if !strings.HasPrefix(e, typ+".") {
		return nil, false
	}
	parts := splitDots(strings.TrimPrefix(e, typ+"."))
	var steps []step
	for _, p := range parts {
		switch {
		case ofTypeStep.MatchString(p):
			if len(steps) == 0 {
				return nil, false
			}
			steps[len(steps)-1].ofType = ofTypeStep.FindStringSubmatch(p)[1]
		case resolveIs.MatchString(p):
			if len(steps) == 0 {
				return nil, false
			}
			steps[len(steps)-1].refType = resolveIs.FindStringSubmatch(p)[1]
		case wherePattern.MatchString(p):
			if len(steps) == 0 {
				return nil, false
			}
			m := wherePattern.FindStringSubmatch(p)
			steps[len(steps)-1].whereField, steps[len(steps)-1].whereValue = m[1], m[2]
		case isIdent(p):
			steps = append(steps, step{field: p})
		default:
			return nil, false
		}
	}
	return steps, len(steps) > 0
}

func isIdent(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if !unicode.IsLetter(c) && !unicode.IsDigit(c) && c != '_' {
			return false
		}
	}
	return true
}

func splitDots(s string) []string {
	var out []string
	depth, start := 0, 0
	for i, c := range s {
		switch c {
		case '(':
			depth++
		case ')':
			depth--
		case '.':
			if depth == 0 {
				out = append(out, s[start:i])
				start = i + 1
			}
		}
	}
	return append(out, s[start:])
}

// searchIndex maps type → code → Param, built once.
var searchIndex = sync.OnceValue(func() map[string]map[string]*Param {
	d := R4()
	idx := map[string]map[string]*Param{}
	for _, sp := range d.Search {
		switch sp.Type {
		case "token", "reference", "date", "string", "quantity", "number", "uri":
		default:
			continue // composite and special are not supported
		}
		for _, base := range sp.Base {
			if base == "Resource" || base == "DomainResource" || !d.IsResourceType(base) {
				continue
			}
			p := &Param{Code: sp.Code, Type: sp.Type, Targets: sp.Target}
			ok := true
			for _, part := range splitUnion(sp.Expression) {
				if !strings.HasPrefix(strings.TrimLeft(strings.TrimSpace(part), "("), base+".") {
					continue
				}
				steps, good := compileExpr(base, part)
				if !good {
					ok = false
					break
				}
				p.paths = append(p.paths, steps)
			}
			if !ok || len(p.paths) == 0 {
				continue
			}
			if idx[base] == nil {
				idx[base] = map[string]*Param{}
			}
			idx[base][sp.Code] = p
		}
	}
	return idx
})

func splitUnion(e string) []string {
	var out []string
	depth, start := 0, 0
	for i, c := range e {
		switch c {
		case '(':
			depth++
		case ')':
			depth--
		case '|':
			if depth == 0 {
				out = append(out, e[start:i])
				start = i + 1
			}
		}
	}
	return append(out, e[start:])
}

// commonParams are the parameters every resource type has.
var commonParams = map[string]*Param{
	"_id":          {Code: "_id", Type: "token", paths: [][]step{{{field: "id"}}}},
	"_lastUpdated": {Code: "_lastUpdated", Type: "date", paths: [][]step{{{field: "meta"}, {field: "lastUpdated"}}}},
	"_tag":         {Code: "_tag", Type: "token", paths: [][]step{{{field: "meta"}, {field: "tag"}}}},
	"_security":    {Code: "_security", Type: "token", paths: [][]step{{{field: "meta"}, {field: "security"}}}},
	"_profile":     {Code: "_profile", Type: "uri", paths: [][]step{{{field: "meta"}, {field: "profile"}}}},
}

// LookupParam returns the parameter code of resource type typ, or nil.
func LookupParam(typ, code string) *Param {
	if p := commonParams[code]; p != nil {
		return p
	}
	return searchIndex()[typ][code]
}

// SearchParams lists the supported parameters of typ (code and type), sorted.
func SearchParams(typ string) [][2]string {
	var out [][2]string
	for code, p := range commonParams {
		out = append(out, [2]string{code, p.Type})
	}
	for code, p := range searchIndex()[typ] {
		out = append(out, [2]string{code, p.Type})
	}
	sort.Slice(out, func(i, j int) bool { return out[i][0] < out[j][0] })
	return out
}

// Values evaluates the parameter's element paths on a decoded resource.
func (p *Param) Values(res map[string]any) []any {
	var out []any
	for _, path := range p.paths {
		out = evalSteps(res, path, out)
	}
	return out
}

func evalSteps(v any, path []step, out []any) []any {
	if len(path) == 0 {
		return append(out, v)
	}
	switch x := v.(type) {
	case []any:
		for _, item := range x {
			out = evalSteps(item, path, out)
		}
		return out
	case map[string]any:
		s := path[0]
		var vals []any
		if s.ofType != "" {
			if val, ok := x[s.field+strings.ToUpper(s.ofType[:1])+s.ofType[1:]]; ok {
				vals = append(vals, val)
			} else if val, ok := x[s.field]; ok {
				// A ResourceList element narrowed by type (contained resources).
				vals = append(vals, filterResourceType(val, s.ofType)...)
			}
		} else if val, ok := x[s.field]; ok {
			vals = append(vals, val)
		} else {
			// A choice element named without its type: value → valueQuantity, valueString, …
			for k, val := range x {
				if len(k) > len(s.field) && strings.HasPrefix(k, s.field) && unicode.IsUpper(rune(k[len(s.field)])) {
					vals = append(vals, val)
				}
			}
		}
		for _, val := range vals {
			for _, item := range flatten(val) {
				if s.refType != "" {
					ref, _ := item.(map[string]any)
					r, _ := ref["reference"].(string)
					if t, _, ok := strings.Cut(r, "/"); !ok || !strings.HasSuffix(t, s.refType) && !strings.Contains(r, "/"+s.refType+"/") {
						continue
					}
				}
				if s.whereField != "" {
					m, _ := item.(map[string]any)
					if fmt.Sprint(m[s.whereField]) != s.whereValue {
						continue
					}
				}
				out = evalSteps(item, path[1:], out)
			}
		}
	}
	return out
}

func flatten(v any) []any {
	if arr, ok := v.([]any); ok {
		return arr
	}
	return []any{v}
}

func filterResourceType(v any, typ string) []any {
	var out []any
	for _, item := range flatten(v) {
		if m, ok := item.(map[string]any); ok && m["resourceType"] == typ {
			out = append(out, m)
		}
	}
	return out
}

// PatientLinked reports whether every element p reads on typ is one through
// which the Patient CompartmentDefinition puts typ in a patient's
// compartment. A resource that matches p with a reference to Patient/x is
// then in x's compartment, so a store may narrow the search to that
// compartment (its index) before p itself is evaluated.
func PatientLinked(typ string, p *Param) bool {
	if p == nil || p.Type != "reference" || len(p.paths) == 0 {
		return false
	}
	linked := R4().compartmentPaths[typ]
	for _, path := range p.paths {
		var fields []string
		for _, s := range path {
			if s.ofType != "" || s.whereField != "" || s.refType != "" && s.refType != "Patient" {
				return false
			}
			fields = append(fields, s.field)
		}
		if !slices.ContainsFunc(linked, func(l []string) bool { return slices.Equal(l, fields) }) {
			return false
		}
	}
	return true
}
