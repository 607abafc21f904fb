package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

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

// TestServeAtTheRoot (issue 19, finding 5): kiln serve --base-path / starts
// (it used to panic registering its routes) and answers the seed's literal
// paths, /$export and /Patient/$export, with files under the root.
func TestServeAtTheRoot(t *testing.T) {
	k := &kilnProc{t: t, bin: buildKiln(t), basePath: "/",
		args: []string{"--base-path", "/", "--data", t.TempDir(), "--demo", "--demo-patients", "3", "--log-level", "error"}}
	k.start()
	defer k.stop()
	for _, path := range []string{"/$export", "/Patient/$export"} {
		loc := k.kickOff(path)
		if !strings.HasPrefix(loc, "http://"+k.addr+"/$export/") {
			t.Fatalf("%s: Content-Location %q", path, loc)
		}
		code, m := awaitExport(t, loc, time.Minute)
		if code != 200 || len(m.Output) == 0 {
			t.Fatalf("%s: %d %+v", path, code, m)
		}
		for _, o := range m.Output {
			if !strings.HasPrefix(o.URL, loc+"/file/") {
				t.Errorf("%s: file %s is not under %s", path, o.URL, loc)
			}
		}
		checkExport(t, loc, m, countOutput(m))
	}
}

// countOutput is the sum of the manifest's counts.
func countOutput(m *manifest) int {
	n := 0
	for _, o := range m.Output {
		n += o.Count
	}
	return n
}

// TestRefusesUnreachableWorkers (issue 16, finding 6): a launcher whose
// workers are other processes is refused at start unless they can reach the
// store (PostgreSQL) and, for pods, the sink (S3); so is kiln worker on SQLite.
func TestRefusesUnreachableWorkers(t *testing.T) {
	for _, args := range [][]string{
		{"serve", "--addr", "127.0.0.1:0", "--data", t.TempDir(), "--launcher", "kubernetes", "--k8s-image", "kiln:test"},
		{"serve", "--addr", "127.0.0.1:0", "--data", t.TempDir(), "--launcher", "process"},
		{"worker", "--data", t.TempDir()},
	} {
		if code, _, errOut := runCLI(t, args...); code != 1 || !strings.Contains(errOut, "needs --store postgres") {
			t.Errorf("%v: %d %q", args, code, errOut)
		}
	}
	pg := storeFlags{kind: "postgres"}
	for _, tc := range []struct {
		launcher, sink string
		refused        bool
	}{
		{"kubernetes", "local", true}, {"kubernetes", "s3", false}, {"process", "local", false}, {"inprocess", "local", false},
	} {
		f := launcherFlags{kind: tc.launcher}
		err := f.reachable(&pg, &sinkFlags{kind: tc.sink})
		if (err != nil) != tc.refused || tc.refused && !strings.Contains(err.Error(), "needs --sink s3") {
			t.Errorf("--launcher %s --sink %s: %v", tc.launcher, tc.sink, err)
		}
	}
}
