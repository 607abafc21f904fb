package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/ingest"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/postgres"
	"github.com/kiln-fhir/kiln/synth"
)

// TestWorkersShareOneExport: three kiln worker processes run one export from
// PostgreSQL; one is killed (SIGKILL) in the middle of a unit; the
// coordinator hands its unit back when its lease runs out, another worker
// takes it over, and the export holds exactly the expected resources, none
// twice.
func TestWorkersShareOneExport(t *testing.T) {
	url := os.Getenv("KILN_POSTGRES_URL")
	if url == "" {
		if os.Getenv("KILN_REQUIRE_INTEGRATION") == "1" {
			t.Fatal("KILN_POSTGRES_URL is not set, and KILN_REQUIRE_INTEGRATION=1")
		}
		t.Skip("KILN_POSTGRES_URL not set")
	}
	ctx := context.Background()
	dir := t.TempDir()
	bin := filepath.Join(dir, "kiln")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	b := make([]byte, 5)
	rand.Read(b)
	schema := "workers_" + hex.EncodeToString(b)
	db, err := postgres.Open(ctx, url, postgres.Options{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer postgres.DropSchema(ctx, url, schema)
	defer db.Close()
	gen := filepath.Join(dir, "gen")
	if _, err := synth.Generate(ctx, gen, synth.Options{Patients: 60, Seed: 3}); err != nil {
		t.Fatal(err)
	}
	if _, err := ingest.Load(ctx, db, []string{gen}, ingest.LoadOptions{NewID: uuid.NewString}); err != nil {
		t.Fatal(err)
	}
	counts, _ := db.Counts(ctx)
	data := filepath.Join(dir, "data")
	sink, _ := localfs.New(filepath.Join(data, "exports"))
	// The test is the API server: it coordinates (reclaims the killed
	// worker's unit when its lease runs out); the kiln workers only work.
	svc := export.New(db, db, sink, export.Config{UnitSize: 500, Lease: time.Second, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	cctx, stopCoordinator := context.WithCancel(ctx)
	coordinated := make(chan struct{})
	go func() { defer close(coordinated); svc.Coordinate(cctx) }()
	defer func() { stopCoordinator(); <-coordinated }()
	req := export.NewRequest(kiln.LevelSystem)
	req.PatientReferenceBatchSize, req.FetchResourceBatchSize = 10, 5
	job, err := svc.Start(ctx, req, "t")
	if err != nil {
		t.Fatal(err)
	}
	if job.UnitsTotal < 20 {
		t.Fatalf("only %d units", job.UnitsTotal)
	}
	var procs []*exec.Cmd
	for i := range 3 {
		cmd := exec.Command(bin, "worker", "--store", "postgres", "--postgres-url", url, "--postgres-schema", schema,
			"--data", data, "--job", job.ID, "--export-workers", "1", "--unit-lease", "1s", "--log-level", "warn")
		cmd.Stderr = &prefixWriter{t: t, prefix: []byte{'w', byte('0' + i), ' '}}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		procs = append(procs, cmd)
	}
	defer func() {
		for _, p := range procs {
			p.Process.Kill()
		}
	}()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// Kill worker 0 once all three are in the middle of units and some are done.
	deadline := time.Now().Add(time.Minute)
	for {
		var running, done int
		conn.QueryRow(ctx, `SELECT count(*) FILTER (WHERE state='running'), count(*) FILTER (WHERE state='done') FROM `+pgx.Identifier{schema, "units"}.Sanitize()+` WHERE job=$1`, job.ID).Scan(&running, &done)
		if running == 3 && done >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("workers never all busy (running %d, done %d)", running, done)
		}
		time.Sleep(5 * time.Millisecond)
	}
	procs[0].Process.Kill()
	procs[0].Wait()
	for _, p := range procs[1:] {
		if err := waitTimeout(p, 2*time.Minute); err != nil {
			t.Fatalf("worker: %v", err)
		}
	}
	var redone int
	conn.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{schema, "units"}.Sanitize()+` WHERE job=$1 AND attempts > 1`, job.ID).Scan(&redone)
	if redone == 0 {
		t.Error("no unit was redone after the kill")
	}
	j, err := db.GetJob(ctx, job.ID)
	if err != nil || j.State != kiln.JobCompleted {
		t.Fatalf("job: %v %+v", err, j)
	}
	got := map[string][]string{}
	for _, f := range j.Files {
		rc, _, err := svc.OpenFile(ctx, j, f.Name)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(rc)
		sc.Buffer(make([]byte, 1<<20), 16<<20)
		for sc.Scan() {
			var r struct{ ResourceType, ID string }
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				t.Fatalf("%s: torn line: %v", f.Name, err)
			}
			got[r.ResourceType] = append(got[r.ResourceType], r.ID)
		}
		rc.Close()
	}
	for typ, n := range counts {
		ids := got[typ]
		sort.Strings(ids)
		if int64(len(ids)) != n || len(slices.Compact(slices.Clone(ids))) != len(ids) {
			t.Errorf("%s: %d lines (%d distinct), store has %d", typ, len(ids), len(slices.Compact(slices.Clone(ids))), n)
		}
	}
	t.Logf("%d units, %d redone after the kill", j.UnitsTotal, redone)
}

func waitTimeout(cmd *exec.Cmd, d time.Duration) error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		cmd.Process.Kill()
		return <-done
	}
}

type prefixWriter struct {
	t      *testing.T
	prefix []byte
}

func (w *prefixWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s%s", w.prefix, p)
	return len(p), nil
}
