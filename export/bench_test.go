package export_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/sqlite"
)

// BenchmarkSystemExport is the export engine per resource: one op exports
// 20,000 Observations of 100 patients from SQLite to local files with two
// workers, kick-off to completed; the metric is ns per exported resource.
// go test -bench SystemExport ./export
func BenchmarkSystemExport(b *testing.B) {
	ctx := context.Background()
	dir := b.TempDir()
	db, err := sqlite.Open(ctx, dir)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	sink, err := localfs.New(filepath.Join(dir, "exports"))
	if err != nil {
		b.Fatal(err)
	}
	const n = 20_000
	var ws []kiln.Write
	for i := range n {
		p, err := fhir.Parse(fmt.Appendf(nil, `{"resourceType":"Observation","id":"o%d","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/p%d"},"valueQuantity":{"value":%d,"unit":"/min"}}`, i, i%100, 60+i%40))
		if err != nil {
			b.Fatal(err)
		}
		ws = append(ws, fhir.Prepare(p, p.ID, fhir.Options{}))
		if len(ws) == 1000 {
			if _, err := db.Write(ctx, ws); err != nil {
				b.Fatal(err)
			}
			ws = ws[:0]
		}
	}
	svc := export.New(db, db, sink, export.Config{Workers: 2, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	go svc.Run(runCtx)
	b.ResetTimer()
	for range b.N {
		job, err := svc.Start(ctx, export.NewRequest(kiln.LevelSystem), "bench")
		if err != nil {
			b.Fatal(err)
		}
		for job.State != kiln.JobCompleted {
			if job.State == kiln.JobFailed {
				b.Fatalf("export failed: %s", job.Error)
			}
			time.Sleep(time.Millisecond) // polling a condition; the metric is the engine's, not the poll's
			if job, err = svc.Job(ctx, job.ID); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		if err := svc.Cancel(ctx, job.ID); err != nil { // removes its files: the next op starts from the same disk state
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/resource")
}
