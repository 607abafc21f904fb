package synth

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
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
	for _, typ := range []string{"Patient", "Encounter", "Observation", "Condition", "Procedure", "MedicationRequest", "Immunization", "AllergyIntolerance", "DiagnosticReport", "Claim", "ExplanationOfBenefit", "Practitioner", "Organization", "Location", "Group"} {
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
