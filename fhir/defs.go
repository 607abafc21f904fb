// Package fhir holds Kiln's knowledge of FHIR R4 as data: resource types and
// their element structure (from HL7's JSON Schema), their mandatory elements
// (from the resource StructureDefinitions), the Patient
// CompartmentDefinition with the element paths its parameters stand for, and
// the SearchParameter definitions; plus validation, canonical encoding,
// reference extraction, instants and Parameters parsing built on them.
package fhir

//go:generate go run ../internal/gen -src ../../shared/data/fhir-r4 -out r4.json

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"sort"
	"sync"
)

//go:embed r4.json
var r4JSON []byte

// Prop is one element of a complex type.
type Prop struct {
	Name  string   `json:"n"`
	Type  string   `json:"t"`
	Array bool     `json:"a,omitempty"`
	Enum  []string `json:"e,omitempty"`
	enum  map[string]bool
}

// TypeDef is a complex type or resource.
type TypeDef struct {
	Name  string
	Props []*Prop `json:"props"`
	// Required is the JSON Schema's list, which the validator enforces. It
	// leaves out mandatory primitives (Observation.status), since their _name
	// twin may stand in for them.
	Required []string `json:"required,omitempty"`
	// Mandatory lists, for resource types, the top-level elements with min ≥ 1
	// in the R4 StructureDefinition, in its order; a choice element by its base
	// name (MedicationRequest.medication[x] is "medication").
	Mandatory []string `json:"mandatory,omitempty"`
	byName    map[string]*Prop
}

// Prop returns the element called name, or nil.
func (t *TypeDef) Prop(name string) *Prop { return t.byName[name] }

// SearchParam is an R4 SearchParameter, as data.
type SearchParam struct {
	Code       string   `json:"code"`
	Base       []string `json:"base"`
	Type       string   `json:"type"`
	Expression string   `json:"expression,omitempty"`
	Target     []string `json:"target,omitempty"`
}

// Definitions is the R4 table. It is read-only after load.
type Definitions struct {
	Resources   []string                       `json:"resources"`
	Primitives  map[string]string              `json:"primitives"`
	Types       map[string]*TypeDef            `json:"types"`
	Compartment map[string]map[string][]string `json:"compartment"`
	Search      []SearchParam                  `json:"search"`
	resources   map[string]bool
	// compartmentPaths[type] lists the split element paths of all its linking parameters.
	compartmentPaths map[string][][]string
}

// R4 returns the R4 definitions, parsed once.
var R4 = sync.OnceValue(func() *Definitions {
	var d Definitions
	if err := json.Unmarshal(r4JSON, &d); err != nil {
		panic(fmt.Sprintf("fhir: embedded r4.json: %v", err)) // a build defect, not input
	}
	d.resources = make(map[string]bool, len(d.Resources))
	for _, r := range d.Resources {
		d.resources[r] = true
	}
	for name, t := range d.Types {
		t.Name = name
		t.byName = make(map[string]*Prop, len(t.Props))
		for _, p := range t.Props {
			t.byName[p.Name] = p
			if len(p.Enum) > 0 {
				p.enum = make(map[string]bool, len(p.Enum))
				for _, e := range p.Enum {
					p.enum[e] = true
				}
			}
		}
	}
	d.compartmentPaths = map[string][][]string{}
	for typ, params := range d.Compartment {
		seen := map[string]bool{}
		var names []string
		for name := range params {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			for _, p := range params[name] {
				if !seen[p] {
					seen[p] = true
					d.compartmentPaths[typ] = append(d.compartmentPaths[typ], splitPath(p))
				}
			}
		}
	}
	return &d
})

// IsResourceType reports whether name is an R4 resource type.
func (d *Definitions) IsResourceType(name string) bool { return d.resources[name] }

// InCompartment reports whether resources of type typ can be in a Patient compartment.
func (d *Definitions) InCompartment(typ string) bool {
	_, ok := d.Compartment[typ]
	return ok || typ == "Patient"
}

// CompartmentTypes lists the resource types of the Patient compartment, sorted.
func (d *Definitions) CompartmentTypes() []string {
	var out []string
	for _, r := range d.Resources {
		if d.InCompartment(r) {
			out = append(out, r)
		}
	}
	return out
}

func splitPath(p string) []string {
	var out []string
	start := 0
	for i := 0; i < len(p); i++ {
		if p[i] == '.' {
			out = append(out, p[start:i])
			start = i + 1
		}
	}
	return append(out, p[start:])
}
