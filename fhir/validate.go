package fhir

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"

	"github.com/kiln-fhir/kiln"
)

// maxIssues caps the problems reported for one resource; the first few are what a client fixes first.
const maxIssues = 20

var idPattern = regexp.MustCompile(`^[A-Za-z0-9\-.]{1,64}$`)

// ValidID reports whether id is a legal FHIR logical id.
func ValidID(id string) bool { return idPattern.MatchString(id) }

// Parsed is a decoded, structurally valid resource.
type Parsed struct {
	Type string
	ID   string
	Map  map[string]any
}

// Parse decodes body as one FHIR R4 resource and checks it against the R4
// structure: a JSON object, a known resourceType, known elements only, each
// with the JSON type, cardinality and (for required codes) value that R4
// gives it, and required elements present. Numbers keep their exact text.
// Patterns of primitive types other than id are not checked.
func Parse(body []byte) (*Parsed, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, &kiln.Error{Code: kiln.EINVALID, Message: "body is not valid JSON: " + jsonErr(err)}
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, &kiln.Error{Code: kiln.EINVALID, Message: "body has data after the JSON resource"}
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, &kiln.Error{Code: kiln.EINVALID, Message: "body is not a JSON object"}
	}
	return FromMap(m)
}

// FromMap validates an already decoded resource (as Parse does); numbers must be json.Number.
func FromMap(m map[string]any) (*Parsed, error) {
	rt, _ := m["resourceType"].(string)
	if rt == "" {
		return nil, kiln.Invalid("resourceType", "resource has no resourceType")
	}
	d := R4()
	if !d.IsResourceType(rt) {
		return nil, kiln.Invalid("resourceType", "unknown resourceType %q", rt)
	}
	v := validator{d: d}
	v.object(m, d.Types[rt], rt)
	if len(v.issues) > 0 {
		e := &kiln.Error{Code: kiln.EINVALID, Message: v.issues[0].Message, Expression: []string{v.issues[0].Expression}, Issues: v.issues}
		if len(v.issues) > 1 {
			e.Message = fmt.Sprintf("%s (and %d more problems)", e.Message, len(v.issues)-1)
		}
		return nil, e
	}
	p := &Parsed{Type: rt, Map: m}
	if id, ok := m["id"].(string); ok {
		if !ValidID(id) {
			return nil, kiln.Invalid(rt+".id", "id %q is not 1-64 characters of A-Z, a-z, 0-9, '-' and '.'", id)
		}
		p.ID = id
	}
	return p, nil
}

func jsonErr(err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("%v at byte %d", se, se.Offset)
	}
	return err.Error()
}

type validator struct {
	d      *Definitions
	issues []kiln.Issue
}

func (v *validator) add(path, format string, args ...any) {
	if len(v.issues) < maxIssues {
		v.issues = append(v.issues, kiln.Issue{Expression: path, Message: fmt.Sprintf(format, args...)})
	}
}

func (v *validator) object(m map[string]any, t *TypeDef, path string) {
	if len(m) == 0 {
		// FHIR: an element has a value or children; {} is neither.
		v.add(path, "%s must not be an empty object", path)
		return
	}
	for k, val := range m {
		p := t.Prop(k)
		if p == nil {
			v.add(path+"."+k, "unknown element %q in %s", k, t.Name)
			continue
		}
		ep := path + "." + k
		if p.Array {
			arr, ok := val.([]any)
			if !ok {
				v.add(ep, "%s must be a JSON array", ep)
				continue
			}
			if len(arr) == 0 {
				v.add(ep, "%s must not be an empty array", ep)
			}
			for i, item := range arr {
				// null items only align primitive arrays with their _element twins.
				if item == nil && (k[0] == '_' || v.d.Primitives[p.Type] != "") {
					continue
				}
				v.value(item, p, ep+"["+strconv.Itoa(i)+"]")
			}
			continue
		}
		if _, isArr := val.([]any); isArr {
			v.add(ep, "%s must not be an array", ep)
			continue
		}
		v.value(val, p, ep)
	}
	for _, r := range t.Required {
		if _, ok := m[r]; !ok {
			if _, ok := m["_"+r]; !ok {
				v.add(path+"."+r, "%s.%s is required", path, r)
			}
		}
	}
}

func (v *validator) value(val any, p *Prop, path string) {
	if val == nil {
		v.add(path, "%s must not be null", path)
		return
	}
	if kind, ok := v.d.Primitives[p.Type]; ok || p.Type == "string" || p.Type == "number" || p.Type == "boolean" || p.Type == "code" {
		if !ok {
			kind = p.Type
			if p.Type == "code" {
				kind = "string"
			}
		}
		switch kind {
		case "string":
			s, ok := val.(string)
			if !ok {
				v.add(path, "%s must be a JSON string", path)
				return
			}
			if s == "" {
				v.add(path, "%s must not be an empty string", path)
			}
			if p.enum != nil && !p.enum[s] {
				v.add(path, "%s has the value %q, which is not one of the allowed codes", path, s)
			}
		case "number":
			if _, ok := val.(json.Number); !ok {
				v.add(path, "%s must be a JSON number", path)
			}
		case "boolean":
			if _, ok := val.(bool); !ok {
				v.add(path, "%s must be true or false", path)
			}
		}
		return
	}
	m, ok := val.(map[string]any)
	if !ok {
		v.add(path, "%s must be a JSON object", path)
		return
	}
	if p.Type == "ResourceList" {
		rt, _ := m["resourceType"].(string)
		if !v.d.IsResourceType(rt) {
			v.add(path+".resourceType", "%s holds a resource with unknown resourceType %q", path, rt)
			return
		}
		v.object(m, v.d.Types[rt], path+"("+rt+")")
		return
	}
	t := v.d.Types[p.Type]
	if t == nil {
		return // a type the schema leaves open
	}
	v.object(m, t, path)
}
