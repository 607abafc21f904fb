package synth

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln/fhir"
)

func TestDeterministicAndValid(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	sa, err := Generate(context.Background(), a, Options{Patients: 5, Seed: 7})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Generate(context.Background(), b, Options{Patients: 5, Seed: 7}); err != nil {
		t.Fatal(err)
	}
	per := float64(sa.Total()) / 5
	if per < 250 || per > 450 {
		t.Errorf("%.0f resources per patient; Synthea gives about 300-400", per)
	}
	for _, typ := range []string{"Patient", "Encounter", "Observation", "Condition", "Procedure", "MedicationRequest", "Immunization", "AllergyIntolerance", "DiagnosticReport", "Claim", "ExplanationOfBenefit", "Practitioner", "Organization", "Location", "Group", "Provenance"} {
		if sa[typ] == 0 {
			t.Errorf("no %s generated", typ)
		}
		fa, _ := os.ReadFile(filepath.Join(a, typ+".ndjson"))
		fb, _ := os.ReadFile(filepath.Join(b, typ+".ndjson"))
		if !bytes.Equal(fa, fb) {
			t.Errorf("%s differs between runs with one seed", typ)
		}
		for i, line := range bytes.Split(bytes.TrimSpace(fa), []byte("\n")) {
			if _, err := fhir.Parse(line); err != nil {
				t.Fatalf("%s line %d is not valid R4: %v", typ, i+1, err)
			}
		}
	}
	c := t.TempDir()
	Generate(context.Background(), c, Options{Patients: 5, Seed: 8})
	fa, _ := os.ReadFile(filepath.Join(a, "Patient.ndjson"))
	fc, _ := os.ReadFile(filepath.Join(c, "Patient.ndjson"))
	if bytes.Equal(fa, fc) {
		t.Error("another seed gave the same patients")
	}
}

// Provenance is one per encounter, and targets the encounter's patient, the
// encounter, and generated resources that reference that encounter.
func TestProvenancePerEncounter(t *testing.T) {
	dir := t.TempDir()
	st, err := Generate(context.Background(), dir, Options{Patients: 3, Seed: 11})
	if err != nil {
		t.Fatal(err)
	}
	if st["Provenance"] != st["Encounter"] {
		t.Fatalf("%d Provenance for %d encounters", st["Provenance"], st["Encounter"])
	}
	bodies := map[string]string{} // Type/id → body
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		data, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
			var r struct{ ResourceType, ID string }
			if err := json.Unmarshal(line, &r); err != nil {
				t.Fatal(err)
			}
			bodies[r.ResourceType+"/"+r.ID] = string(line)
		}
	}
	data, _ := os.ReadFile(filepath.Join(dir, "Provenance.ndjson"))
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		var p struct {
			ID     string
			Target []struct{ Reference string }
			Agent  []struct{ Who struct{ Reference string } }
		}
		json.Unmarshal(line, &p)
		enc := strings.TrimPrefix(p.ID, "prov-")
		if len(p.Target) < 5 || p.Target[1].Reference != "Encounter/"+enc || !strings.Contains(bodies["Encounter/"+enc], `"subject":{"reference":"`+p.Target[0].Reference+`"}`) {
			t.Fatalf("Provenance/%s targets %v, not its encounter's patient and the encounter", p.ID, p.Target)
		}
		for _, tg := range p.Target[2:] {
			body, ok := bodies[tg.Reference]
			if !ok {
				t.Fatalf("Provenance/%s targets %s, which was not generated", p.ID, tg.Reference)
			}
			if !strings.Contains(body, `"Encounter/`+enc+`"`) {
				t.Errorf("Provenance/%s targets %s, which is not of encounter %s", p.ID, tg.Reference, enc)
			}
		}
		if len(p.Agent) == 0 || bodies[p.Agent[0].Who.Reference] == "" {
			t.Errorf("Provenance/%s agent %v is not a generated resource", p.ID, p.Agent)
		}
	}
}
