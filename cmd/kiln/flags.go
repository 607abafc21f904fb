package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/kiln-fhir/kiln"
)

var errUsage = errors.New("usage")

func version() string { return kiln.Version }

// parseFlags parses args, letting KILN_<NAME> environment variables set any
// flag the command line leaves alone.
func parseFlags(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errUsage
		}
		return errUsage
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		env := "KILN_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", env, v, e)
			}
		}
	})
	return err
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// workerFlags are the engine flags of the worker role, the same in kiln
// serve and kiln worker; everything else a unit needs comes with its job.
type workerFlags struct {
	workers int
	lease   time.Duration
}

func (w *workerFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&w.workers, "export-workers", runtime.NumCPU(), "export units run in parallel")
	fs.DurationVar(&w.lease, "unit-lease", 30*time.Second, "how long a worker holds an export unit without a heartbeat before another worker takes it over")
}
