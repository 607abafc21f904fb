package ingest_test

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln/ingest"
	"github.com/kiln-fhir/kiln/sqlite"
)

func dataDir(t *testing.T, set string) string {
	t.Helper()
	d := filepath.Join("..", "..", "shared", "data", set)
	if _, err := os.Stat(d); err != nil {
		t.Fatalf("test data %s not found beside the repository: %v", set, err)
	}
	return d
}

// lineCounts counts the lines of each <Type>.ndjson.gz, independently of the loader.
func lineCounts(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "*.ndjson.gz"))
	out := map[string]int64{}
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		zr, err := gzip.NewReader(fh)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(zr)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			if len(strings.TrimSpace(sc.Text())) > 0 {
				out[strings.TrimSuffix(filepath.Base(f), ".ndjson.gz")]++
			}
		}
		fh.Close()
	}
	return out
}

func open(t *testing.T) *sqlite.DB {
	db, err := sqlite.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func TestLoadSyntheaSets(t *testing.T) {
	for _, set := range []string{"synthea-r4-100", "synthea-r4-615"} {
		t.Run(set, func(t *testing.T) {
			dir := dataDir(t, set)
			want := lineCounts(t, dir)
			db := open(t)
			st, err := ingest.Load(context.Background(), db, []string{dir}, ingest.LoadOptions{NewID: uuid.NewString})
			if err != nil {
				t.Fatal(err)
			}
			if st.RejectedCount != 0 {
				t.Fatalf("rejected %d: %+v", st.RejectedCount, st.Rejected[:min(5, len(st.Rejected))])
			}
			counts, _ := db.Counts(context.Background())
			for typ, n := range want {
				if st.Written[typ] != n || counts[typ] != n {
					t.Errorf("%s: file has %d lines, loader wrote %d, store counts %d", typ, n, st.Written[typ], counts[typ])
				}
			}
			if len(counts) != len(want) {
				t.Errorf("store has %d types, files %d", len(counts), len(want))
			}
			// Loading again changes nothing.
			st2, err := ingest.Load(context.Background(), db, []string{dir}, ingest.LoadOptions{NewID: uuid.NewString})
			if err != nil {
				t.Fatal(err)
			}
			if len(st2.Written) != 0 || st2.Unchanged != st.Read {
				t.Fatalf("second load wrote %v, %d unchanged of %d", st2.Written, st2.Unchanged, st.Read)
			}
		})
	}
}

func TestLoadSourceBundles(t *testing.T) {
	dir := dataDir(t, "synthea-r4-100")
	out := t.TempDir()
	f, err := os.Open(filepath.Join(dir, "source-bundles.tar.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, _ := gzip.NewReader(f)
	tr := tar.NewReader(zr)
	n := 0
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag != tar.TypeReg || !strings.HasSuffix(h.Name, ".json") {
			continue
		}
		dst, _ := os.Create(filepath.Join(out, filepath.Base(h.Name)))
		io.Copy(dst, tr)
		dst.Close()
		n++
	}
	db := open(t)
	st, err := ingest.Load(context.Background(), db, []string{out}, ingest.LoadOptions{NewID: uuid.NewString})
	if err != nil {
		t.Fatal(err)
	}
	if st.RejectedCount != 0 || st.Files != n {
		t.Fatalf("%d files, %d read; rejected %+v", n, st.Files, st.Rejected)
	}
	// The Bundles hold the same resources as the NDJSON, duplicates of shared
	// Organizations and Practitioners aside.
	want := lineCounts(t, dir)
	counts, _ := db.Counts(context.Background())
	for typ, c := range want {
		if counts[typ] != c {
			t.Errorf("%s: %d from Bundles, %d in NDJSON", typ, counts[typ], c)
		}
	}
	// urn:uuid references were rewritten, so the compartments are filled.
	refs, err := db.CompartmentOf(context.Background(), "6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2")
	if err != nil || len(refs) < 50 {
		t.Fatalf("compartment of a Bundle's patient: %d %v", len(refs), err)
	}
}

func TestLoadReportsRejectedLines(t *testing.T) {
	dir := t.TempDir()
	body := `{"resourceType":"Patient","id":"ok1"}
not json
{"resourceType":"Patient","id":"bad id"}

{"resourceType":"Patient","id":"ok2","gender":"nope"}
{"resourceType":"Patient","id":"ok3"}
`
	os.WriteFile(filepath.Join(dir, "p.ndjson"), []byte(body), 0o644)
	var buf strings.Builder
	zw := gzip.NewWriter(&nopWriter{&buf})
	zw.Write([]byte(strings.Repeat(`{"resourceType":"Observation","status":"final","code":{"text":"x"}}`+"\n", 3)))
	zw.Close()
	os.WriteFile(filepath.Join(dir, "o.ndjson.gz"), []byte(buf.String()), 0o644)
	db := open(t)
	st, err := ingest.Load(context.Background(), db, []string{dir}, ingest.LoadOptions{NewID: uuid.NewString, Batch: 2})
	if err != nil {
		t.Fatal(err)
	}
	if st.Written["Patient"] != 2 || st.Written["Observation"] != 3 || st.RejectedCount != 3 {
		t.Fatalf("stats %+v", st)
	}
	lines := []int{st.Rejected[0].Line, st.Rejected[1].Line, st.Rejected[2].Line}
	if lines[0] != 2 || lines[1] != 3 || lines[2] != 5 || !strings.HasSuffix(st.Rejected[0].File, "p.ndjson") {
		t.Fatalf("rejected %+v", st.Rejected)
	}
	if !strings.Contains(st.Rejected[2].Reason, "gender") {
		t.Fatalf("reason %q", st.Rejected[2].Reason)
	}
}

type nopWriter struct{ b *strings.Builder }

func (w *nopWriter) Write(p []byte) (int, error) { return w.b.Write(p) }
