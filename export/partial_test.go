package export

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/sqlite"
)

// TestPartialManifestPages runs an allowPartialManifests export one unit at a
// time: each poll that finds new files makes a page of them, a page never
// changes once made, and the completed job's files are its pages in order,
// which together hold every resource once.
func TestPartialManifestPages(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db, err := sqlite.Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	sink, _ := localfs.New(filepath.Join(dir, "exports"))
	s := New(db, db, sink, Config{UnitSize: 4, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	var ws []kiln.Write
	for i := range 6 {
		for _, b := range []string{
			fmt.Sprintf(`{"resourceType":"Patient","id":"p%d"}`, i),
			fmt.Sprintf(`{"resourceType":"Observation","id":"o%d","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p%d"}}`, i, i),
		} {
			p, err := fhir.Parse([]byte(b))
			if err != nil {
				t.Fatal(err)
			}
			ws = append(ws, fhir.Prepare(p, p.ID, fhir.Options{}))
		}
	}
	if _, err := db.Write(ctx, ws); err != nil {
		t.Fatal(err)
	}
	req := NewRequest(kiln.LevelSystem)
	req.PatientReferenceBatchSize, req.FetchResourceBatchSize, req.AllowPartialManifests = 10, 2, true
	j, err := s.Start(ctx, req, "t")
	if err != nil {
		t.Fatal(err)
	}
	if j.UnitsTotal < 4 {
		t.Fatalf("only %d units", j.UnitsTotal)
	}
	runOne := func() {
		t.Helper()
		u, err := db.ClaimUnit(ctx, time.Minute)
		if err != nil || u == nil {
			t.Fatalf("claim: %v %v", u, err)
		}
		s.runUnit(ctx, u, 0)
	}
	poll := func() *kiln.Job {
		t.Helper()
		cur, err := s.Job(ctx, j.ID)
		if err != nil {
			t.Fatal(err)
		}
		if cur, err = s.PartialPages(ctx, cur); err != nil {
			t.Fatal(err)
		}
		return cur
	}
	if got := poll(); len(got.Pages) != 0 {
		t.Fatalf("pages before any unit ran: %v", got.Pages)
	}
	var seen [][]kiln.File
	for len(seen) < 2 {
		runOne()
		if got := poll(); len(got.Pages) > len(seen) {
			if len(seen) > 0 && !reflect.DeepEqual(got.Pages[:len(seen)], seen) {
				t.Fatal("an earlier page changed")
			}
			seen = got.Pages
		}
	}
	if again := poll(); len(again.Pages) != len(seen) {
		t.Fatal("a poll with nothing new made a page")
	}
	for {
		cur, _ := s.Job(ctx, j.ID)
		if cur.Finished() {
			break
		}
		runOne()
	}
	done, _ := s.Job(ctx, j.ID)
	if done.State != kiln.JobCompleted || len(done.Pages) <= len(seen) || !reflect.DeepEqual(done.Pages[:len(seen)], seen) {
		t.Fatalf("completed job: state %s, pages %v, earlier %v", done.State, done.Pages, seen)
	}
	if !slices.EqualFunc(done.Files, slices.Concat(done.Pages...), func(a, b kiln.File) bool { return a.Name == b.Name }) {
		t.Fatal("the files are not the pages in order")
	}
	ids := map[string]int{}
	for _, f := range done.Files {
		rc, _, err := s.OpenFile(ctx, done, f.Name)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(rc)
		rc.Close()
		for _, line := range strings.Split(string(b), "\n") {
			if line != "" {
				ids[line]++
			}
		}
	}
	if len(ids) != 12 {
		t.Fatalf("%d distinct lines in the pages' files, want 12", len(ids))
	}
	for l, n := range ids {
		if n != 1 {
			t.Fatalf("line in %d files: %s", n, l)
		}
	}
}
