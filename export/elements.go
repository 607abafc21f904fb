package export

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"unicode"

	"github.com/kiln-fhir/kiln/fhir"
)

// elementNames returns the JSON names of element e in t: e itself, or the
// typed forms of a choice element (value → valueQuantity, valueString, …).
func elementNames(t *fhir.TypeDef, e string) []string {
	if t.Prop(e) != nil {
		return []string{e}
	}
	var out []string
	for _, p := range t.Props {
		if len(p.Name) > len(e) && strings.HasPrefix(p.Name, e) && unicode.IsUpper(rune(p.Name[len(e)])) {
			out = append(out, p.Name)
		}
	}
	return out
}

// subsetter applies _elements to resources of one type.
type subsetter struct {
	keep map[string]bool
}

// newSubsetter returns nil when _elements does not apply to typ.
//
// Besides the requested elements it keeps id, meta and the elements the base
// specification makes mandatory, as the Bulk Data IG asks, so that each
// subsetted resource is still a valid one: the StructureDefinition's min ≥ 1
// elements (Mandatory, which has the mandatory primitives such as
// Observation.status) and the JSON Schema's required ones (Required, which the
// validator enforces, and which holds EvidenceVariable.characteristic where
// HL7's snapshot has min 0). Each keeps its _name twin, which carries a
// primitive's id and extensions, and every typed form of a choice element.
func newSubsetter(typ string, elements []string) *subsetter {
	if len(elements) == 0 {
		return nil
	}
	keep := map[string]bool{"resourceType": true, "id": true, "meta": true}
	t := fhir.R4().Types[typ]
	if t == nil {
		return &subsetter{keep: keep}
	}
	keepElement := func(name string) {
		for _, n := range elementNames(t, name) {
			keep[n], keep["_"+n] = true, true
		}
	}
	for _, r := range t.Mandatory {
		keepElement(r)
	}
	for _, r := range t.Required {
		keepElement(r)
	}
	for _, e := range elements {
		name := e
		if typName, el, ok := strings.Cut(e, "."); ok {
			if typName != typ {
				continue
			}
			name = el
		}
		keepElement(name)
	}
	// A type that _elements names nothing of gets only its mandatory elements.
	return &subsetter{keep: keep}
}

const (
	subsettedSystem = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
	subsettedCode   = "SUBSETTED"
)

// apply returns body with only the kept elements and the SUBSETTED tag.
func (s *subsetter) apply(body []byte) ([]byte, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("decode stored resource: %w", err)
	}
	for k := range m {
		if !s.keep[k] {
			delete(m, k)
		}
	}
	meta, _ := m["meta"].(map[string]any)
	if meta == nil {
		meta = map[string]any{}
		m["meta"] = meta
	}
	tags, _ := meta["tag"].([]any)
	// A resource stored subsetted (a client may write one) already has the tag;
	// a second copy would be a duplicate Coding.
	for _, tag := range tags {
		if c, _ := tag.(map[string]any); c["system"] == subsettedSystem && c["code"] == subsettedCode {
			return fhir.Encode(m), nil
		}
	}
	meta["tag"] = append(tags, map[string]any{"system": subsettedSystem, "code": subsettedCode, "display": "subsetted"})
	return fhir.Encode(m), nil
}
