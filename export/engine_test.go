package export_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/internal/heappeak"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/sqlite"
)

type rig struct {
	db  *sqlite.DB
	svc *export.Service
}

// openLocal opens an SQLite store and a local sink in a new folder.
func openLocal(t *testing.T) (*sqlite.DB, *localfs.Sink) {
	t.Helper()
	dir := t.TempDir()
	db, err := sqlite.Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	sink, err := localfs.New(filepath.Join(dir, "exports"))
	if err != nil {
		t.Fatal(err)
	}
	return db, sink
}

func newRig(t *testing.T, cfg export.Config) *rig {
	db, sink := openLocal(t)
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	svc := export.New(db, db, sink, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); svc.Run(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return &rig{db: db, svc: svc}
}

func (r *rig) put(t *testing.T, bodies ...string) {
	t.Helper()
	ws := make([]kiln.Write, 0, len(bodies))
	for _, b := range bodies {
		p, err := fhir.Parse([]byte(b))
		if err != nil {
			t.Fatal(err)
		}
		ws = append(ws, fhir.Prepare(p, p.ID, fhir.Options{}))
	}
	if _, err := r.db.Write(context.Background(), ws); err != nil {
		t.Fatal(err)
	}
}

// run exports and reads every file, returning lines and a bound on the Go
// heap's growth while the export ran (see heappeak).
func (r *rig) run(t *testing.T, req *kiln.ExportRequest) (int64, uint64) {
	t.Helper()
	ctx := context.Background()
	w := heappeak.Start()
	job, err := r.svc.Start(ctx, req, "t")
	if err != nil {
		t.Fatal(err)
	}
	for {
		j, err := r.svc.Job(ctx, job.ID)
		if err != nil {
			t.Fatal(err)
		}
		if j.State == kiln.JobCompleted {
			job = j
			break
		}
		if j.State == kiln.JobFailed {
			t.Fatalf("export failed: %s", j.Error)
		}
		time.Sleep(5 * time.Millisecond)
	}
	var lines int64
	buf := make([]byte, 64<<10)
	for _, f := range job.Files {
		rc, _, err := r.svc.OpenFile(ctx, job, f.Name)
		if err != nil {
			t.Fatal(err)
		}
		for {
			n, err := rc.Read(buf)
			lines += int64(strings.Count(string(buf[:n]), "\n"))
			if err != nil {
				break
			}
		}
		rc.Close()
	}
	growth, _ := w.Stop()
	return lines, growth
}

func systemReq() *kiln.ExportRequest {
	r := export.NewRequest(kiln.LevelSystem)
	r.PatientReferenceBatchSize = 100
	return r
}

// TestMemoryBoundedByBatchNotData: the heap an export needs depends on the
// batch size and the largest resource, not on how many resources there are.
func TestMemoryBoundedByBatchNotData(t *testing.T) {
	r := newRig(t, export.Config{Workers: 2})
	// One 10 MB resource, far over what a batch of 1000 small ones takes.
	big := fmt.Sprintf(`{"resourceType":"Binary","id":"big","contentType":"text/plain","data":"%s"}`, strings.Repeat("QUJD", 10<<20/4))
	r.put(t, big)
	n, heapBig := r.run(t, systemReq())
	if n != 1 {
		t.Fatalf("exported %d lines", n)
	}
	t.Logf("one 10 MB resource: peak heap growth %.1f MB", float64(heapBig)/1e6)
	if heapBig > 64<<20 {
		t.Errorf("one 10 MB resource took %d MB of heap", heapBig>>20)
	}
	small := func(from, to int) {
		var bodies []string
		for i := from; i < to; i++ {
			bodies = append(bodies, fmt.Sprintf(`{"resourceType":"Observation","id":"o%d","status":"final","code":{"text":"%s"}}`, i, strings.Repeat("x", 200)))
			if len(bodies) == 5000 {
				r.put(t, bodies...)
				bodies = bodies[:0]
			}
		}
		if len(bodies) > 0 {
			r.put(t, bodies...)
		}
	}
	small(0, 20_000)
	req := systemReq()
	req.Types = []string{"Observation"}
	n1, heap1 := r.run(t, req)
	small(20_000, 200_000)
	n2, heap2 := r.run(t, req)
	t.Logf("%d small resources: peak heap growth %.1f MB; %d: %.1f MB", n1, float64(heap1)/1e6, n2, float64(heap2)/1e6)
	if n1 != 20_000 || n2 != 200_000 {
		t.Fatalf("exported %d and %d lines", n1, n2)
	}
	// Ten times the data (about 50 MB of NDJSON) may not take ten times the
	// heap. (The peak includes garbage not yet collected, which varies with
	// the machine's load: hence the slack.)
	if heap2 > 32<<20 || heap2 > 4*heap1+12<<20 {
		t.Errorf("heap grew with the data: %d MB for 20k, %d MB for 200k", heap1>>20, heap2>>20)
	}
}

// TestJobSettingsTravelWithTheJob (issue 16, finding 1): the file limits,
// retention, base URLs and sink location of the server that accepted an
// export are the job's, whatever process runs its units and finishes it: a
// worker with the defaults (1,000,000 resources a file, 24 h) and its sink
// in another folder, finishing a job accepted with 2 resources a file and
// 1 h, gives 3 files kept 1 h, in the server's folder, where the server
// serves them from.
func TestJobSettingsTravelWithTheJob(t *testing.T) {
	ctx := context.Background()
	db, sink := openLocal(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	clock := func() time.Time { return now }
	server := export.New(db, db, sink, export.Config{Logger: log, MaxFileResources: 2, Retention: time.Hour, Now: clock,
		Ref: fhir.Options{Bases: []string{"https://kiln.example/fhir"}}})
	elsewhere, err := localfs.New(filepath.Join(t.TempDir(), "worker-exports"))
	if err != nil {
		t.Fatal(err)
	}
	worker := export.New(db, db, elsewhere, export.Config{Logger: log, Now: clock})
	r := &rig{db: db}
	r.put(t, `{"resourceType":"Patient","id":"a"}`, `{"resourceType":"Patient","id":"b"}`, `{"resourceType":"Patient","id":"c"}`,
		`{"resourceType":"Patient","id":"d"}`, `{"resourceType":"Patient","id":"e"}`)
	job, err := server.Start(ctx, systemReq(), "t")
	if err != nil {
		t.Fatal(err)
	}
	wctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); worker.Run(wctx) }()
	t.Cleanup(func() { stop(); <-done })
	for deadline := time.Now().Add(time.Minute); job.State != kiln.JobCompleted; time.Sleep(5 * time.Millisecond) {
		if job.State == kiln.JobFailed || time.Now().After(deadline) {
			t.Fatalf("export %s: %s", job.State, job.Error)
		}
		if job, err = worker.Job(ctx, job.ID); err != nil {
			t.Fatal(err)
		}
	}
	if len(job.Files) != 3 || !job.Expires.Equal(now.Add(time.Hour)) {
		t.Errorf("finished by a worker with default flags: %d files, expires %s; want 3 files of at most 2, expiring %s", len(job.Files), job.Expires, now.Add(time.Hour))
	}
	if got := job.Settings.Bases; len(got) != 1 || got[0] != "https://kiln.example/fhir" {
		t.Errorf("job bases %v", got)
	}
	if left, _ := os.ReadDir(elsewhere.Root); len(left) != 0 {
		t.Errorf("the worker wrote to its own sink: %v", left)
	}
	var lines int
	for _, f := range job.Files {
		rc, _, err := server.OpenFile(ctx, job, f.Name)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatalf("%s from the server's sink: %v", f.Name, err)
		}
		lines += strings.Count(string(b), "\n")
	}
	if lines != 5 {
		t.Errorf("the server reads %d resources of the job's files, want 5", lines)
	}
}

// TestSweepGoesOnPastAnUnreachableLocation: an expired export whose files
// are at a location this process cannot open (the sink was changed since)
// is removed all the same, with the location logged, and does not keep the
// sweep from removing the other expired exports.
func TestSweepGoesOnPastAnUnreachableLocation(t *testing.T) {
	ctx := context.Background()
	db, sink := openLocal(t)
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	svc := export.New(db, db, sink, export.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Retention: time.Hour, Now: clock, Workers: 1})
	r := &rig{db: db, svc: svc}
	r.put(t, `{"resourceType":"Patient","id":"a"}`)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); svc.Run(runCtx) }()
	defer func() { stop(); <-done }()
	var ids []string
	for range 2 {
		job, err := svc.Start(ctx, systemReq(), "t")
		if err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(time.Minute); job.State != kiln.JobCompleted; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) || job.State == kiln.JobFailed {
				t.Fatalf("export %s", job.State)
			}
			job, _ = svc.Job(ctx, job.ID)
		}
		ids = append(ids, job.ID)
	}
	if _, err := db.UpdateJob(ctx, ids[0], func(j *kiln.Job) error { j.Settings.Sink = "s3://another-bucket/exports"; return nil }); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	if err := svc.Sweep(ctx); err != nil {
		t.Fatalf("sweep: %v", err)
	}
	for _, id := range ids {
		if _, err := svc.Job(ctx, id); kiln.ErrorCode(err) != kiln.ENOTFOUND {
			t.Errorf("expired export %s after the sweep: %v", id, err)
		}
	}
}
