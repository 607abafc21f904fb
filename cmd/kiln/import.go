package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"time"

	"github.com/google/uuid"
	"golang.org/x/term"

	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/ingest"
)

func cmdImport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kiln import", flag.ContinueOnError)
	var sf storeFlags
	sf.register(fs)
	batch := fs.Int("batch", 2000, "resources per write transaction")
	workers := fs.Int("workers", runtime.NumCPU(), "parallel parsers")
	base := fs.String("base-url", "", "absolute base URL(s) of this server, comma-separated; absolute references under them count as local")
	maxLine := fs.Int("max-line-bytes", 64<<20, "longest NDJSON line (one resource) accepted")
	quiet := fs.Bool("quiet", false, "no progress display")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: kiln import [flags] PATH…\n\nLoads NDJSON (.ndjson, .ndjson.gz), Bundle or resource JSON files, or folders of them.\nIds are kept, so loading the same files twice leaves the same data.\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return errUsage
	}
	db, closer, err := sf.open(ctx)
	if err != nil {
		return err
	}
	defer closer.Close()
	start := time.Now()
	tty := false
	if f, ok := stderr.(*os.File); ok && !*quiet {
		tty = term.IsTerminal(int(f.Fd()))
	}
	var lastDraw time.Time
	st, err := ingest.Load(ctx, db, fs.Args(), ingest.LoadOptions{
		Ref:     fhir.Options{Bases: splitList(*base)},
		Batch:   *batch,
		Workers: *workers,
		MaxLine: *maxLine,
		NewID:   func() string { return uuid.NewString() },
		Progress: func(s ingest.Stats) {
			if !tty || time.Since(lastDraw) < 200*time.Millisecond {
				return
			}
			lastDraw = time.Now()
			el := time.Since(start).Seconds()
			fmt.Fprintf(stderr, "\r\033[Kimporting: %d resources, %.1f MB read, %.0f resources/s", s.Read, float64(s.Bytes)/1e6, float64(s.Read)/el)
		},
	})
	if tty {
		fmt.Fprint(stderr, "\r\033[K")
	}
	printImportSummary(stdout, st, time.Since(start))
	return err
}

func printImportSummary(w io.Writer, st ingest.Stats, el time.Duration) {
	var types []string
	var total int64
	for t, n := range st.Written {
		types = append(types, t)
		total += n
	}
	sort.Strings(types)
	fmt.Fprintf(w, "imported %d files in %.2fs: %d written, %d unchanged, %d rejected (%.0f resources/s)\n",
		st.Files, el.Seconds(), total, st.Unchanged, st.RejectedCount, float64(st.Read)/el.Seconds())
	for _, t := range types {
		fmt.Fprintf(w, "  %-28s %d\n", t, st.Written[t])
	}
	for _, r := range st.Rejected {
		fmt.Fprintf(w, "rejected %s:%d: %s\n", r.File, r.Line, r.Reason)
	}
	if st.RejectedCount > int64(len(st.Rejected)) {
		fmt.Fprintf(w, "… and %d more rejected\n", st.RejectedCount-int64(len(st.Rejected)))
	}
}
