package postgres_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/postgres"
)

// openSchema opens a store in a schema of its own, dropped after the test.
func openSchema(t *testing.T) *postgres.DB {
	t.Helper()
	u := url(t)
	b := make([]byte, 6)
	rand.Read(b)
	schema := "test_" + hex.EncodeToString(b)
	db, err := postgres.Open(context.Background(), u, postgres.Options{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.Close()
		postgres.DropSchema(context.Background(), u, schema)
	})
	return db
}

// eventually waits for cond, failing after limit (the condition, not the
// wait, is what the test asserts).
func eventually(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(limit); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, limit)
		}
	}
}

// TestLeaderLease: one holder at a time; the holder renews; a resign hands
// the role on at once; a holder that stops renewing (a dead process) loses
// it when its lease runs out on the database's clock.
func TestLeaderLease(t *testing.T) {
	db := openSchema(t)
	ctx := context.Background()
	lead := func(holder string, ttl time.Duration) bool {
		t.Helper()
		ok, err := db.Lead(ctx, "role", holder, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if !lead("a", time.Minute) || lead("b", time.Minute) || !lead("a", time.Minute) {
		t.Fatal("a should lead, b not, a renew")
	}
	if ok, err := db.Lead(ctx, "other-role", "b", time.Minute); err != nil || !ok {
		t.Fatal("another role name is another election")
	}
	if err := db.Resign(ctx, "role", "b"); err != nil || lead("b", time.Minute) {
		t.Fatal("b resigning what it does not hold changes nothing")
	}
	if err := db.Resign(ctx, "role", "a"); err != nil || !lead("b", 300*time.Millisecond) {
		t.Fatalf("after a resigns, b leads: %v", err)
	}
	if lead("a", time.Minute) {
		t.Fatal("b's lease is current")
	}
	eventually(t, 10*time.Second, "a takes over once b's lease runs out", func() bool { return lead("a", time.Minute) })
}

// crashing is a store whose process dies instead of resigning.
type crashing struct{ *postgres.DB }

func (crashing) Resign(context.Context, string, string) error { return nil }

// TestOneCoordinator (issue 16): two API servers on one store; only the
// elected one does the coordinator's maintenance, the other none; when the
// leader dies without resigning, the other takes over within the lease;
// a clean stop hands the role on at once.
func TestOneCoordinator(t *testing.T) {
	db := openSchema(t)
	sink, err := localfs.New(filepath.Join(t.TempDir(), "exports"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := export.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Lease: 400 * time.Millisecond, LeaderLease: 600 * time.Millisecond}
	a := export.New(db, crashing{db}, sink, cfg)
	b := export.New(db, db, sink, cfg)
	ctxA, stopA := context.WithCancel(context.Background())
	ctxB, stopB := context.WithCancel(context.Background())
	doneA, doneB := make(chan struct{}), make(chan struct{})
	go func() { defer close(doneA); a.Coordinate(ctxA) }()
	t.Cleanup(func() { stopA(); <-doneA })
	eventually(t, 5*time.Second, "a leads", a.Leading)
	go func() { defer close(doneB); b.Coordinate(ctxB) }()
	t.Cleanup(func() { stopB(); <-doneB })
	// While a leads, b only stands by: a's maintenance goes on, b makes none.
	start := a.MaintenancePasses()
	eventually(t, 5*time.Second, "a keeps maintaining", func() bool { return a.MaintenancePasses() >= start+5 })
	if b.Leading() || b.MaintenancePasses() != 0 {
		t.Fatalf("b leads %v, with %d maintenance passes, while a leads", b.Leading(), b.MaintenancePasses())
	}
	// a dies: it stops without resigning; b takes over when the lease runs out.
	stopA()
	<-doneA
	eventually(t, 5*time.Second, "b takes over from a dead leader", func() bool { return b.Leading() && b.MaintenancePasses() > 0 })
	if a.Leading() {
		t.Fatal("a still says it leads after stopping")
	}
	// A clean stop of b resigns: the role is free at once, not a lease later.
	stopB()
	<-doneB
	if ok, err := db.Lead(context.Background(), "export-coordinator", "a third server", time.Minute); err != nil || !ok {
		t.Fatalf("after b stopped cleanly, the role is not free: %v", err)
	}
}

// TestAnotherProcessLeavesRunningUnits (issue 16, finding 2): a server or
// worker that starts beside a running one does not hand its live units back:
// the claim stays held, on its first attempt.
func TestAnotherProcessLeavesRunningUnits(t *testing.T) {
	db := openSchema(t)
	ctx := context.Background()
	now := time.Now().UTC()
	if err := db.CreateJob(ctx, &kiln.Job{ID: "j", Owner: "me", State: kiln.JobInProgress, Created: now, Updated: now},
		[]kiln.Unit{{Job: "j", Seq: 0, Kind: kiln.UnitType, Type: "Patient"}}, kiln.JobLimits{}); err != nil {
		t.Fatal(err)
	}
	u, err := db.ClaimUnit(ctx, time.Minute) // the running process's claim
	if err != nil || u == nil {
		t.Fatalf("claim: %v %v", u, err)
	}
	sink, _ := localfs.New(filepath.Join(t.TempDir(), "exports"))
	other := export.New(db, db, sink, export.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Lease: 400 * time.Millisecond})
	rctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); other.Run(rctx) }()
	eventually(t, 5*time.Second, "the new process's maintenance runs", func() bool { return other.MaintenancePasses() >= 3 })
	stop()
	<-done
	if c, err := db.HeartbeatUnit(ctx, u, time.Minute); c != kiln.ClaimHeld || err != nil {
		t.Fatalf("the running process's claim after another started: %v %v", c, err)
	}
}

// hanging is a store whose lease renewals hang once hang is set (a full
// connection pool, a half-dead network).
type hanging struct {
	*postgres.DB
	hang atomic.Bool
}

func (h *hanging) Lead(ctx context.Context, name, holder string, ttl time.Duration) (bool, error) {
	if h.hang.Load() {
		<-ctx.Done()
		return false, ctx.Err()
	}
	return h.DB.Lead(ctx, name, holder, ttl)
}

// TestHangingRenewalStandsDown (review finding): a coordinator whose lease
// renewal hangs stops maintaining before its lease can run out, so that the
// server taking over is never a second coordinator.
func TestHangingRenewalStandsDown(t *testing.T) {
	db := openSchema(t)
	sink, _ := localfs.New(filepath.Join(t.TempDir(), "exports"))
	h := &hanging{DB: db}
	svc := export.New(db, h, sink, export.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Lease: 400 * time.Millisecond, LeaderLease: 600 * time.Millisecond})
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); svc.Coordinate(ctx) }()
	t.Cleanup(func() { stop(); <-done })
	eventually(t, 5*time.Second, "leads", svc.Leading)
	h.hang.Store(true)
	eventually(t, 5*time.Second, "stands down while renewals hang", func() bool { return !svc.Leading() })
}
