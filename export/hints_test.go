package export_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/sqlite"
)

// recordingStore notes the batch size of every scan.
type recordingStore struct {
	*sqlite.DB
	mu      sync.Mutex
	batches []int
}

func (r *recordingStore) Scan(ctx context.Context, q kiln.ScanQuery, fn func([]byte) error) error {
	r.mu.Lock()
	r.batches = append(r.batches, q.Batch)
	r.mu.Unlock()
	return r.DB.Scan(ctx, q, fn)
}

// recordingSink notes the part size every file is written with.
type recordingSink struct {
	kiln.Sink
	mu    sync.Mutex
	parts []int64
}

func (r *recordingSink) Create(ctx context.Context, job, name string, opt kiln.WriteOptions) (io.WriteCloser, error) {
	r.mu.Lock()
	r.parts = append(r.parts, opt.PartSize)
	r.mu.Unlock()
	return r.Sink.Create(ctx, job, name, opt)
}

// TestHelixBatchHints (issue 19): the Helix job parameters do what the
// README says — patientReferenceBatchSize is the patients per work unit,
// fetchResourceBatchSize the resources per store query, uploadPartSize the
// part size the sink writes with — and not only pass validation.
func TestHelixBatchHints(t *testing.T) {
	ctx := context.Background()
	db, local := openLocal(t)
	var bodies []string
	for i := range 7 {
		bodies = append(bodies, fmt.Sprintf(`{"resourceType":"Patient","id":"p%d"}`, i),
			fmt.Sprintf(`{"resourceType":"Observation","id":"o%d","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p%d"}}`, i, i))
	}
	(&rig{db: db}).put(t, bodies...)
	store := &recordingStore{DB: db}
	sink := &recordingSink{Sink: local}
	svc := export.New(store, db, sink, export.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Workers: 1})
	wctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); svc.Run(wctx) }()
	t.Cleanup(func() { stop(); <-done })
	for _, tc := range []struct {
		patientBatch, fetch int
		part                int64
		units               int
	}{
		{3, 2, 5 << 20, 3}, // ⌈7/3⌉ patient units
		{7, 1000, 8 << 20, 1},
	} {
		store.mu.Lock()
		store.batches = nil
		store.mu.Unlock()
		sink.mu.Lock()
		sink.parts = nil
		sink.mu.Unlock()
		req := export.NewRequest(kiln.LevelPatient)
		req.PatientReferenceBatchSize, req.FetchResourceBatchSize, req.UploadPartSize = tc.patientBatch, tc.fetch, tc.part
		job, err := svc.Start(ctx, req, "t")
		if err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(time.Minute); job.State != kiln.JobCompleted; time.Sleep(5 * time.Millisecond) {
			if job.State == kiln.JobFailed || time.Now().After(deadline) {
				t.Fatalf("export %s: %s", job.State, job.Error)
			}
			if job, err = svc.Job(ctx, job.ID); err != nil {
				t.Fatal(err)
			}
		}
		if job.UnitsTotal != tc.units {
			t.Errorf("patientReferenceBatchSize=%d: %d units, want %d", tc.patientBatch, job.UnitsTotal, tc.units)
		}
		store.mu.Lock()
		if len(store.batches) == 0 || slices.ContainsFunc(store.batches, func(b int) bool { return b != tc.fetch }) {
			t.Errorf("fetchResourceBatchSize=%d: store queries with batches %v", tc.fetch, store.batches)
		}
		store.mu.Unlock()
		sink.mu.Lock()
		if len(sink.parts) == 0 || slices.ContainsFunc(sink.parts, func(p int64) bool { return p != tc.part }) {
			t.Errorf("uploadPartSize=%d: files written with part sizes %v", tc.part, sink.parts)
		}
		sink.mu.Unlock()
	}
}
