package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln/fhirparquet"
)

// TestPullParquet (issue 21): kiln pull --format parquet saves Parquet
// resource files holding exactly the resources an NDJSON pull of the same
// server holds; --verify checks them (and finds a damaged one); an
// incremental pull in Parquet is refused, not half done.
func TestPullParquet(t *testing.T) {
	bin := buildKiln(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	seedStore(t, bin, dir, 6, 3, []string{"--data", data})
	k := &kilnProc{t: t, bin: bin, args: []string{"--data", data, "--log-level", "error", "--max-file-resources", "300"}}
	k.start()
	defer k.stop()

	nd, pq := filepath.Join(dir, "ndjson"), filepath.Join(dir, "parquet")
	for _, args := range [][]string{{"--out", nd}, {"--out", pq, "--format", "parquet"}} {
		if out, err := exec.Command(bin, append([]string{"pull", "--server", k.base()}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("kiln pull %v: %v\n%s", args, err, out)
		}
	}
	want := folderResources(t, nd)
	files, _ := filepath.Glob(filepath.Join(pq, "*.parquet"))
	if ndjson, _ := filepath.Glob(filepath.Join(pq, "*.ndjson")); len(ndjson) > 0 || len(files) < 2 {
		t.Fatalf("parquet folder: %d Parquet files, NDJSON %v", len(files), ndjson)
	}
	var got []string
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := fh.Stat()
		typ, _, _ := strings.Cut(filepath.Base(f), ".")
		if _, err := fhirparquet.ReadKeys(fh, fi.Size(), func(rt, id string) error {
			if rt != typ {
				t.Errorf("%s: a %s", f, rt)
			}
			got = append(got, rt+"/"+id)
			return nil
		}); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		fh.Close()
	}
	slices.Sort(got)
	var keys []string
	for k := range want {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if !slices.Equal(got, keys) {
		t.Errorf("Parquet pull: %d resources, NDJSON pull %d", len(got), len(keys))
	}
	if out, err := exec.Command(bin, "pull", "--verify", pq).CombinedOutput(); err != nil {
		t.Fatalf("--verify: %v\n%s", err, out)
	}
	// A pull folder holds health records: owner-only, whatever the umask.
	for _, folder := range []string{nd, pq} {
		if fi, err := os.Stat(folder); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("%s: mode %v %v", folder, fi.Mode(), err)
		}
		entries, _ := os.ReadDir(folder)
		for _, e := range entries {
			if fi, err := e.Info(); err == nil && !e.IsDir() && fi.Mode().Perm() != 0o600 {
				t.Errorf("%s: mode %v", e.Name(), fi.Mode())
			}
		}
	}
	// A damaged file: --verify says so.
	b, _ := os.ReadFile(files[0])
	os.WriteFile(files[0], b[:len(b)-20], 0o644)
	if out, err := exec.Command(bin, "pull", "--verify", pq).CombinedOutput(); err == nil || !strings.Contains(string(out), filepath.Base(files[0])) {
		t.Errorf("--verify of a cut Parquet file: %v\n%s", err, out)
	}
	if out, err := exec.Command(bin, "pull", "--server", k.base(), "--since-last", nd, "--format", "parquet").CombinedOutput(); err == nil || !strings.Contains(string(out), "NDJSON") {
		t.Errorf("an incremental Parquet pull: %v\n%s", err, out)
	}
}
