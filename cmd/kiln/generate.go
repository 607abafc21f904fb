package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/kiln-fhir/kiln/synth"
)

func cmdGenerate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kiln generate", flag.ContinueOnError)
	patients := fs.Int("patients", 100, "number of patients")
	seed := fs.Uint64("seed", 1, "random seed; the same seed gives the same files")
	out := fs.String("out", "./kiln-sample", "folder to write <Type>.ndjson files into")
	gz := fs.Bool("gzip", false, "write .ndjson.gz")
	group := fs.String("group-id", "all-patients", "id of the Group of all generated patients")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: kiln generate [flags]\n\nWrites deterministic synthetic patients (about 300-400 resources each, Synthea-like shapes),\none Provenance per encounter (as Synthea writes one per bundle), shared Practitioners,\nOrganizations and Locations, and a Group of all patients.\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if *patients < 1 {
		return fmt.Errorf("--patients must be at least 1")
	}
	start := time.Now()
	st, err := synth.Generate(ctx, *out, synth.Options{Patients: *patients, Seed: *seed, Gzip: *gz, GroupID: *group})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "generated %d patients, %d resources in %s (%.1fs)\n", *patients, st.Total(), *out, time.Since(start).Seconds())
	return nil
}
