package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln"
)

func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestVersionAndUsage(t *testing.T) {
	if code, out, _ := runCLI(t, "version"); code != 0 || strings.TrimSpace(out) != "kiln "+kiln.Version {
		t.Fatalf("version: %d %q", code, out)
	}
	if code, _, errOut := runCLI(t, "frobnicate"); code != 2 || !strings.Contains(errOut, "unknown command") {
		t.Fatalf("unknown command: %d %q", code, errOut)
	}
	if code, _, _ := runCLI(t, "import"); code != 2 {
		t.Fatalf("import without paths: %d", code)
	}
}

func TestGenerateThenImport(t *testing.T) {
	gen, data := t.TempDir(), t.TempDir()
	if code, out, errOut := runCLI(t, "generate", "--patients", "3", "--out", gen); code != 0 || !strings.Contains(out, "generated 3 patients") {
		t.Fatalf("generate: %d %q %q", code, out, errOut)
	}
	t.Setenv("KILN_DATA", data)
	code, out, errOut := runCLI(t, "import", "--quiet", gen)
	if code != 0 || !strings.Contains(out, "0 rejected") || !strings.Contains(out, "Patient") {
		t.Fatalf("import: %d %q %q", code, out, errOut)
	}
	code, out, _ = runCLI(t, "import", "--quiet", gen)
	if code != 0 || !strings.Contains(out, " 0 written") {
		t.Fatalf("second import should write nothing: %q", out)
	}
	if code, _, errOut := runCLI(t, "generate", "--patients", "0"); code != 1 || !strings.Contains(errOut, "at least 1") {
		t.Fatalf("generate 0: %d %q", code, errOut)
	}
}
