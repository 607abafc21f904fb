package fhir

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestTableIsGeneratedFromHL7 regenerates r4.json from HL7's definitions in
// ../shared/data/fhir-r4 and checks that the committed table is the same.
func TestTableIsGeneratedFromHL7(t *testing.T) {
	src := filepath.Join("..", "..", "shared", "data", "fhir-r4")
	if _, err := os.Stat(src); err != nil {
		t.Fatalf("HL7 definitions not found at %s: %v", src, err)
	}
	out := filepath.Join(t.TempDir(), "r4.json")
	cmd := exec.Command("go", "run", "../internal/gen", "-src", src, "-out", out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("gen: %v: %s", err, b)
	}
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, r4JSON) {
		t.Fatal("fhir/r4.json is stale: run go generate ./fhir")
	}
}
