package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
)

// cmdWorker runs export units from the shared store without serving HTTP: the
// process a Kubernetes Job (or any number of extra machines) runs. With --job
// it exits 0 once that job has finished (1 if it failed); without, it runs
// until stopped.
func cmdWorker(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kiln worker", flag.ContinueOnError)
	var sf storeFlags
	sf.register(fs)
	var sink sinkFlags
	sink.register(fs)
	job := fs.String("job", "", "work on units until this export job has finished, then exit")
	var wf workerFlags
	wf.register(fs)
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	logFormat := fs.String("log-format", "text", "text or json")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: kiln worker [flags]\n\nRuns export work units from a shared store (--store postgres) without serving HTTP.\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	log, err := newLogger(stderr, *logLevel, *logFormat)
	if err != nil {
		return err
	}
	if sf.kind != "postgres" {
		// A worker shares exports with a server and other workers through
		// the store; the embedded SQLite store is one process's alone.
		return fmt.Errorf("kiln worker needs --store postgres (with --store %s it could not share an export with anyone)", sf.kind)
	}
	db, closer, err := sf.open(ctx)
	if err != nil {
		return err
	}
	defer closer.Close()
	snk, err := sink.open(ctx, sf.data)
	if err != nil {
		return err
	}
	svc := export.New(db, db, snk, export.Config{Workers: wf.workers, Lease: wf.lease, Logger: log})
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		// The worker role only: claim, heartbeat, execute, finish. The
		// coordinator (on the API servers) reclaims, sweeps and launches.
		svc.Work(runCtx)
	}()
	log.Info("kiln worker running", "store", sf.kind, "job", *job, "workers", wf.workers)
	if *job == "" {
		<-ctx.Done()
		stop()
		wg.Wait()
		return nil
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			stop()
			wg.Wait()
			return ctx.Err()
		case <-t.C:
		}
		j, err := db.GetJob(ctx, *job)
		if err != nil {
			stop()
			wg.Wait()
			if kiln.ErrorCode(err) == kiln.ENOTFOUND {
				return fmt.Errorf("export job %s is gone (cancelled or expired)", *job)
			}
			return err
		}
		if j.Finished() {
			stop()
			wg.Wait()
			if j.State == kiln.JobFailed {
				return fmt.Errorf("export job %s failed: %s", *job, j.Error)
			}
			fmt.Fprintf(stdout, "export job %s %s; this worker ran %d of its units\n", *job, j.State, svc.UnitsFinished())
			return nil
		}
	}
}
