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
func newSubsetter(typ string, elements []string) *subsetter {
	if len(elements) == 0 {
		return nil
	}
	t := fhir.R4().Types[typ]
	keep := map[string]bool{"resourceType": true, "id": true, "meta": true}
	for _, r := range t.Required {
		keep[r] = true
	}
	for _, e := range elements {
		name := e
		if typName, el, ok := strings.Cut(e, "."); ok {
			if typName != typ {
				continue
			}
			name = el
		}
		for _, n := range elementNames(t, name) {
			keep[n], keep["_"+n] = true, true
		}
	}
	// A type that _elements names nothing of gets only its mandatory elements.
	return &subsetter{keep: keep}
}

var subsettedTag = map[string]any{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED", "display": "subsetted"}

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
	meta["tag"] = append(tags, subsettedTag)
	return fhir.Encode(m), nil
}
