// Command gen turns HL7's R4 definitions (the JSON Schema, the resource
// StructureDefinitions, the Patient CompartmentDefinition and the
// SearchParameter bundle) into fhir/r4.json, the
// compact table that package fhir embeds. Run it with `go generate ./fhir`.
package main

import (
	"compress/gzip"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
	"unicode"
)

// The output format; package fhir has the matching reader.
type table struct {
	Resources   []string                       `json:"resources"`
	Primitives  map[string]string              `json:"primitives"`
	Types       map[string]typeDef             `json:"types"`
	Compartment map[string]map[string][]string `json:"compartment"`
	Search      []searchParam                  `json:"search"`
}

type typeDef struct {
	// Props keeps schema order: [name, type, "1" when repeated]; enum values follow for codes.
	Props    []prop   `json:"props"`
	Required []string `json:"required,omitempty"`
	// Mandatory lists the top-level elements with min ≥ 1 in the type's
	// StructureDefinition, choice elements by their base name (value for
	// value[x]). Required (from the JSON Schema) leaves out mandatory
	// primitives, since their _name twin may stand in for them.
	Mandatory []string `json:"mandatory,omitempty"`
}

type prop struct {
	Name  string   `json:"n"`
	Type  string   `json:"t"`
	Array bool     `json:"a,omitempty"`
	Enum  []string `json:"e,omitempty"`
}

type searchParam struct {
	Code       string   `json:"code"`
	Base       []string `json:"base"`
	Type       string   `json:"type"`
	Expression string   `json:"expression,omitempty"`
	Target     []string `json:"target,omitempty"`
}

func main() {
	src := flag.String("src", "../shared/data/fhir-r4", "folder with HL7's R4 definition files")
	out := flag.String("out", "fhir/r4.json", "file to write")
	flag.Parse()
	if err := run(*src, *out); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}

func readJSON(path string, v any) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var r io.Reader = f
	if strings.HasSuffix(path, ".gz") {
		gz, err := gzip.NewReader(f)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		r = gz
	}
	if err := json.NewDecoder(r).Decode(v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

type schemaProp struct {
	Ref   string   `json:"$ref"`
	Type  string   `json:"type"`
	Enum  []string `json:"enum"`
	Const string   `json:"const"`
	Items *struct {
		Ref  string   `json:"$ref"`
		Enum []string `json:"enum"`
	} `json:"items"`
}

type schemaDef struct {
	Type       string                     `json:"type"`
	Properties map[string]json.RawMessage `json:"properties"`
	Required   []string                   `json:"required"`
}

func run(src, out string) error {
	var schema struct {
		Definitions map[string]json.RawMessage `json:"definitions"`
	}
	if err := readJSON(src+"/fhir.schema.json.gz", &schema); err != nil {
		return err
	}
	t := table{Primitives: map[string]string{}, Types: map[string]typeDef{}, Compartment: map[string]map[string][]string{}}
	for name, raw := range schema.Definitions {
		var d schemaDef
		if err := json.Unmarshal(raw, &d); err != nil {
			return fmt.Errorf("definition %s: %w", name, err)
		}
		if d.Properties == nil {
			switch {
			case name == "xhtml":
				t.Primitives[name] = "string"
			case d.Type != "":
				t.Primitives[name] = d.Type
			}
			continue
		}
		// Property order as HL7 lists it; encoding/json loses map order, so re-read keys in order.
		keys, err := orderedKeys(raw)
		if err != nil {
			return fmt.Errorf("definition %s: %w", name, err)
		}
		td := typeDef{Required: d.Required}
		for _, k := range keys {
			var sp schemaProp
			if err := json.Unmarshal(d.Properties[k], &sp); err != nil {
				return fmt.Errorf("%s.%s: %w", name, k, err)
			}
			p := prop{Name: k}
			switch {
			case sp.Const != "":
				p.Type = "string"
			case sp.Type == "array" && sp.Items != nil:
				p.Array = true
				p.Type = refName(sp.Items.Ref)
				if len(sp.Items.Enum) > 0 {
					p.Type, p.Enum = "code", sp.Items.Enum
				}
			case len(sp.Enum) > 0:
				p.Type, p.Enum = "code", sp.Enum
			case sp.Ref == "" && sp.Type != "":
				// An inline primitive (the schema spells some dateTime choices out with a pattern).
				p.Type = sp.Type
			default:
				p.Type = refName(sp.Ref)
			}
			if p.Type == "" {
				return fmt.Errorf("%s.%s: no type", name, k)
			}
			td.Props = append(td.Props, p)
		}
		t.Types[name] = td
	}

	var bundle struct {
		Entry []struct {
			Resource searchParam `json:"resource"`
		} `json:"entry"`
	}
	if err := readJSON(src+"/search-parameters.json.gz", &bundle); err != nil {
		return err
	}
	expr := map[string]string{}
	for _, e := range bundle.Entry {
		sp := e.Resource
		t.Search = append(t.Search, sp)
		for _, b := range sp.Base {
			expr[b+"."+sp.Code] = sp.Expression
		}
	}

	var cd struct {
		Resource []struct {
			Code  string   `json:"code"`
			Param []string `json:"param"`
		} `json:"resource"`
	}
	if err := readJSON(src+"/compartmentdefinition-patient.json", &cd); err != nil {
		return err
	}
	// The CompartmentDefinition names every R4 resource type once; the schema copy
	// also carries a distributor's own types, so it is not the list of record.
	for _, r := range cd.Resource {
		if _, ok := t.Types[r.Code]; !ok {
			return fmt.Errorf("resource type %s has no schema definition", r.Code)
		}
		t.Resources = append(t.Resources, r.Code)
	}
	sort.Strings(t.Resources)
	if err := readMandatory(src+"/profiles-resources.json.gz", &t); err != nil {
		return err
	}
	for _, r := range cd.Resource {
		if len(r.Param) == 0 {
			continue
		}
		params := map[string][]string{}
		for _, p := range r.Param {
			e, ok := expr[r.Code+"."+p]
			if !ok {
				return fmt.Errorf("compartment %s.%s: no search parameter", r.Code, p)
			}
			paths := elementPaths(r.Code, e)
			if len(paths) == 0 {
				return fmt.Errorf("compartment %s.%s: no path in %q", r.Code, p, e)
			}
			params[p] = paths
		}
		t.Compartment[r.Code] = params
	}

	b, err := json.Marshal(t)
	if err != nil {
		return err
	}
	return os.WriteFile(out, b, 0o644)
}

// readMandatory records in t.Types the mandatory top-level elements of each
// resource type, from the snapshots of the resource StructureDefinitions, and
// checks that every resource type of the table has one.
func readMandatory(path string, t *table) error {
	var bundle struct {
		Entry []struct {
			Resource json.RawMessage `json:"resource"`
		} `json:"entry"`
	}
	if err := readJSON(path, &bundle); err != nil {
		return err
	}
	isResource := map[string]bool{}
	for _, r := range t.Resources {
		isResource[r] = true
	}
	seen := map[string]bool{}
	for _, e := range bundle.Entry {
		// The bundle also holds OperationDefinitions (whose "type" is a boolean) and
		// logical models; neither is a resource's shape.
		var head struct {
			ResourceType string `json:"resourceType"`
		}
		if err := json.Unmarshal(e.Resource, &head); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if head.ResourceType != "StructureDefinition" {
			continue
		}
		var sd struct {
			Kind     string `json:"kind"`
			Abstract bool   `json:"abstract"`
			Type     string `json:"type"`
			Snapshot struct {
				Element []struct {
					Path string `json:"path"`
					Min  int    `json:"min"`
				} `json:"element"`
			} `json:"snapshot"`
		}
		if err := json.Unmarshal(e.Resource, &sd); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		// Resource and DomainResource are abstract (their elements reach the concrete
		// types through each snapshot), and the distributor's copy adds a type or two
		// of later releases (SubscriptionStatus): the CompartmentDefinition's list of
		// R4 resource types is the list of record here too.
		if sd.Kind != "resource" || !isResource[sd.Type] {
			continue
		}
		if seen[sd.Type] {
			return fmt.Errorf("%s: two StructureDefinitions of %s", path, sd.Type)
		}
		seen[sd.Type] = true
		td := t.Types[sd.Type]
		for _, el := range sd.Snapshot.Element {
			typ, name, ok := strings.Cut(el.Path, ".")
			if !ok || strings.Contains(name, ".") || el.Min < 1 {
				continue
			}
			if typ != sd.Type {
				return fmt.Errorf("%s: StructureDefinition of %s has element %s", path, sd.Type, el.Path)
			}
			base, choice := strings.CutSuffix(name, "[x]")
			if !hasElement(td, base, choice) {
				return fmt.Errorf("%s: mandatory element %s is not in the schema of %s", path, el.Path, sd.Type)
			}
			td.Mandatory = append(td.Mandatory, base)
		}
		t.Types[sd.Type] = td
	}
	for _, r := range t.Resources {
		if !seen[r] {
			return fmt.Errorf("%s: resource type %s has no StructureDefinition", path, r)
		}
	}
	return nil
}

// hasElement reports whether td has element name or, for a choice element's
// base name, typed forms of it (value → valueQuantity, …).
func hasElement(td typeDef, name string, choice bool) bool {
	for _, p := range td.Props {
		if !choice && p.Name == name {
			return true
		}
		if choice && len(p.Name) > len(name) && strings.HasPrefix(p.Name, name) && unicode.IsUpper(rune(p.Name[len(name)])) {
			return true
		}
	}
	return false
}

func refName(ref string) string { return strings.TrimPrefix(ref, "#/definitions/") }

var whereResolve = regexp.MustCompile(`\.where\(resolve\(\) is [A-Za-z]+\)`)

// elementPaths keeps the union members of a FHIRPath expression that start at
// resourceType and returns them as dotted element paths relative to the resource.
// The `.where(resolve() is Patient)` filter is dropped: the compartment index
// only ever records references that point at a Patient.
func elementPaths(resourceType, expression string) []string {
	var paths []string
	for _, part := range strings.Split(expression, "|") {
		part = strings.TrimSpace(part)
		if !strings.HasPrefix(part, resourceType+".") {
			continue
		}
		part = whereResolve.ReplaceAllString(strings.TrimPrefix(part, resourceType+"."), "")
		paths = append(paths, part)
	}
	return paths
}

// orderedKeys returns the keys of the "properties" object of raw in document order.
func orderedKeys(raw json.RawMessage) ([]string, error) {
	var outer map[string]json.RawMessage
	if err := json.Unmarshal(raw, &outer); err != nil {
		return nil, err
	}
	dec := json.NewDecoder(strings.NewReader(string(outer["properties"])))
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	var keys []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		keys = append(keys, tok.(string))
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return nil, err
		}
	}
	return keys, nil
}
