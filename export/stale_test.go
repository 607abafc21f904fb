package export

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/sqlite"
)

// pausedFinish is the stale worker's view of the job store: just before its
// FinishUnit reaches the store, the worker "pauses" (a GC stall, a frozen
// pod) long enough for its lease to run out and for another worker to claim
// the unit anew and complete the whole job.
type pausedFinish struct {
	kiln.JobStore
	pause func()
}

func (p *pausedFinish) FinishUnit(ctx context.Context, u *kiln.Unit, parts []kiln.Part) (bool, error) {
	p.pause()
	return p.JobStore.FinishUnit(ctx, u, parts)
}

// TestStaleClaimLeavesNewOwnersFiles reproduces issue 16 item 4: a worker
// whose lease ran out before its first heartbeat resumes after the unit's
// new owner completed the job. Its FinishUnit is refused (fencing), and what
// it then cleans up must be its own attempt's files only: the completed
// job's files stay readable with every resource.
// openStore opens an SQLite store and a local sink in dir.
func openStore(t *testing.T, dir string) (*sqlite.DB, *localfs.Sink) {
	t.Helper()
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

func TestStaleClaimLeavesNewOwnersFiles(t *testing.T) {
	ctx := context.Background()
	db, sink := openStore(t, t.TempDir())
	const patients = 6
	var ws []kiln.Write
	for i := range patients {
		p, err := fhir.Parse([]byte(fmt.Sprintf(`{"resourceType":"Patient","id":"p%d"}`, i)))
		if err != nil {
			t.Fatal(err)
		}
		ws = append(ws, fhir.Prepare(p, p.ID, fhir.Options{}))
	}
	if _, err := db.Write(ctx, ws); err != nil {
		t.Fatal(err)
	}
	// A lease long enough that no heartbeat notices anything: the stale
	// worker does not know its claim is gone, as in the issue.
	cfg := Config{Lease: time.Hour, Workers: 1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	owner := New(db, db, sink, cfg)
	req := NewRequest(kiln.LevelSystem)
	req.PatientReferenceBatchSize = 100
	job, err := owner.Start(ctx, req, "t")
	if err != nil {
		t.Fatal(err)
	}
	stale, err := db.ClaimUnit(ctx, cfg.Lease)
	if err != nil || stale == nil {
		t.Fatalf("claim: %v %v", stale, err)
	}
	paused := false
	w := &pausedFinish{JobStore: db, pause: func() {
		if paused {
			return
		}
		paused = true
		// The lease runs out and is reclaimed; the new owner runs every unit.
		if err := db.ReleaseUnit(ctx, stale); err != nil {
			t.Fatal(err)
		}
		for {
			u, err := db.ClaimUnit(ctx, cfg.Lease)
			if err != nil {
				t.Fatal(err)
			}
			if u == nil {
				break
			}
			owner.runUnit(ctx, u, 0)
		}
		j, err := db.GetJob(ctx, job.ID)
		if err != nil || j.State != kiln.JobCompleted {
			t.Fatalf("the new owner did not complete the job: %v %v", j, err)
		}
	}}
	old := New(db, w, sink, cfg)
	old.runUnit(ctx, stale, 0)
	if !paused {
		t.Fatal("the stale worker never reached FinishUnit")
	}
	j, err := owner.Job(ctx, job.ID)
	if err != nil {
		t.Fatal(err)
	}
	if j.State != kiln.JobCompleted {
		t.Fatalf("job %s: %s", j.State, j.Error)
	}
	var lines int
	for _, f := range j.Files {
		rc, _, err := owner.OpenFile(ctx, j, f.Name)
		if err != nil {
			t.Fatalf("file %s of the completed job: %v", f.Name, err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatalf("read %s: %v", f.Name, err)
		}
		if f.Type == "Patient" {
			lines += strings.Count(string(b), "\n")
		}
	}
	if lines != patients {
		t.Fatalf("%d of %d Patients readable", lines, patients)
	}
}

type failingHeartbeat struct{ kiln.JobStore }

func (failingHeartbeat) HeartbeatUnit(context.Context, *kiln.Unit, time.Duration) (kiln.Claim, error) {
	return 0, fmt.Errorf("store unreachable")
}

// TestHeartbeatErrorsLoseTheClaim: heartbeats that only fail must not keep a
// unit running forever; once none succeeded for a whole lease the store may
// have handed the unit on, so the worker gives it up.
func TestHeartbeatErrorsLoseTheClaim(t *testing.T) {
	lease := 150 * time.Millisecond
	// The clock moves a lease per reading, so the second failure is a lease
	// after the start: the outcome does not depend on the ticker's timing.
	var now time.Time
	clock := func() time.Time { now = now.Add(lease); return now }
	s := New(nil, failingHeartbeat{}, nil, Config{Lease: lease, Now: clock, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lost := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.heartbeat(ctx, &kiln.Unit{Job: "j", Seq: 1, Attempts: 1}, func() { close(lost) }, func() { t.Error("job gone reported on errors") })
	}()
	select {
	case <-lost:
	case <-ctx.Done():
		t.Fatal("heartbeats kept failing and the claim was never given up")
	}
	<-done
}

// TestCancelReachesUnitsElsewhere: a unit running in a process other than
// the one that cancelled hears "job gone" on its next heartbeat (not "lost",
// which would leave its files behind) and stops.
func TestCancelReachesUnitsElsewhere(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	db, err := sqlite.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	now := time.Now().UTC()
	if err := db.CreateJob(ctx, &kiln.Job{ID: "j", Owner: "me", State: kiln.JobInProgress, Created: now, Updated: now},
		[]kiln.Unit{{Job: "j", Seq: 0, Kind: kiln.UnitType, Type: "Patient"}}, kiln.JobLimits{}); err != nil {
		t.Fatal(err)
	}
	u, err := db.ClaimUnit(ctx, time.Minute)
	if err != nil || u == nil {
		t.Fatalf("claim: %v %v", u, err)
	}
	// The cancel, as another process's Service.Cancel records it.
	if _, err := db.UpdateJob(ctx, "j", func(j *kiln.Job) error { j.State = kiln.JobCancelled; return nil }); err != nil {
		t.Fatal(err)
	}
	elsewhere := New(db, db, nil, Config{Lease: 150 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	heard := make(chan string, 1)
	elsewhere.heartbeat(ctx, u, func() { heard <- "lost" }, func() { heard <- "gone" })
	select {
	case h := <-heard:
		if h != "gone" {
			t.Fatalf("the unit of a cancelled job heard %q, want gone", h)
		}
	default:
		t.Fatal("the heartbeat stopped without reporting the cancel")
	}
}

// gatedSink holds a unit's first Create until the test opens the gate, and
// then its writes until the unit's context ends, as a slow write would.
type gatedSink struct {
	kiln.Sink
	creating, gate chan struct{}
	once           sync.Once
}

func (g *gatedSink) Create(ctx context.Context, job, name string, opt kiln.WriteOptions) (io.WriteCloser, error) {
	g.once.Do(func() { close(g.creating); <-g.gate })
	w, err := g.Sink.Create(ctx, job, name, opt)
	if err != nil {
		return nil, err
	}
	return &stalledWriter{WriteCloser: w, ctx: ctx}, nil
}

type stalledWriter struct {
	io.WriteCloser
	ctx context.Context
}

func (w *stalledWriter) Write(p []byte) (int, error) {
	<-w.ctx.Done()
	return 0, context.Cause(w.ctx)
}

// TestCancelledUnitElsewhereRemovesItsFiles (issue 16, finding 3): a cancel made by
// one process reaches a unit running in another at its next heartbeat; that
// unit stops and removes the file it created after the cancel had removed
// the job's files, so nothing of the job is left in the sink.
func TestCancelledUnitElsewhereRemovesItsFiles(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db, sink := openStore(t, dir)
	p, _ := fhir.Parse([]byte(`{"resourceType":"Patient","id":"p1"}`))
	if _, err := db.Write(ctx, []kiln.Write{fhir.Prepare(p, p.ID, fhir.Options{})}); err != nil {
		t.Fatal(err)
	}
	cfg := Config{Lease: 300 * time.Millisecond, Workers: 1, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	api := New(db, db, sink, cfg)
	gs := &gatedSink{Sink: sink, creating: make(chan struct{}), gate: make(chan struct{})}
	worker := New(db, db, gs, cfg)
	job, err := api.Start(ctx, NewRequest(kiln.LevelSystem), "t")
	if err != nil {
		t.Fatal(err)
	}
	u, err := db.ClaimUnit(ctx, cfg.Lease)
	if err != nil || u == nil {
		t.Fatalf("claim: %v %v", u, err)
	}
	done := make(chan struct{})
	go func() { defer close(done); worker.runUnit(ctx, u, 0) }()
	select {
	case <-gs.creating:
	case <-done:
		t.Fatal("the unit ended before it created its file")
	}
	if err := api.Cancel(ctx, job.ID); err != nil {
		t.Fatal(err)
	}
	close(gs.gate) // the unit now creates its file, after the cancel removed the job's
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("the unit never heard of the cancel")
	}
	left, _ := filepath.Glob(filepath.Join(dir, "exports", job.ID, "*"))
	if len(left) != 0 {
		t.Fatalf("files of the cancelled job left in the sink: %v", left)
	}
}

// TestBlockOverTheBufferStartsItsOwnFile (review finding): a block that
// outgrows the memory buffer but fits in a file is not split across the
// current file and the next: it starts a file of its own.
func TestBlockOverTheBufferStartsItsOwnFile(t *testing.T) {
	_, sink := openStore(t, t.TempDir())
	w := &partWriter{ctx: context.Background(), sink: sink, job: "j", prefix: "000000-a1-", maxCount: 1000, maxBytes: 10_000,
		open: map[string]*openPart{}, blockBuffer: 1000}
	line := []byte(`{"resourceType":"Observation","id":"` + strings.Repeat("x", 90) + `"}`) // ~130 bytes
	block := func(n int) {
		t.Helper()
		w.beginBlock(blockHeader("p"))
		for range n {
			if err := w.blockLine(line); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.endBlock(); err != nil {
			t.Fatal(err)
		}
	}
	block(50) // ~6.5 kB, held, in the first file
	block(30) // ~4 kB: over the 1 kB buffer, fits a file, not beside the first block
	parts, err := w.close()
	if err != nil {
		t.Fatal(err)
	}
	if len(parts) != 2 || parts[0].Continues || parts[1].Continues || parts[0].Count != 51 || parts[1].Count != 31 {
		t.Fatalf("parts %+v: want each block whole in a file of its own", parts)
	}
}
