// Command kiln is the Kiln FHIR server and its tools.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
)

const usage = `kiln — a FHIR R4 server built around Bulk Data $export

Usage:
  kiln serve    [flags]          run the server (--demo seeds sample patients)
  kiln worker   [flags]          run export work units from a shared store, without HTTP
  kiln import   [flags] PATH…    load NDJSON, NDJSON.gz and Bundle files or folders
  kiln generate [flags]          write deterministic synthetic patients as NDJSON
  kiln bench    [flags]          generate, import and export end to end, and report figures
  kiln pull     --server URL …   run a bulk export on any server and download, verify, resume
  kiln client   add|list|remove  manage SMART Backend Services clients
  kiln token    [flags]          mint a development bearer token
  kiln version                   print the version

Run 'kiln COMMAND -h' for a command's flags. Every flag can also be set with
an environment variable KILN_<FLAG> (upper case, '-' as '_'), e.g. KILN_DATA.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// KILN_CPUPROFILE=FILE writes a CPU profile of any command, for performance work.
	if path := os.Getenv("KILN_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			if err := pprof.StartCPUProfile(f); err == nil {
				code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
				pprof.StopCPUProfile()
				f.Close()
				os.Exit(code)
			}
		}
	}
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "serve":
		err = cmdServe(ctx, args[1:], stdout, stderr)
	case "pull":
		err = cmdPull(ctx, args[1:], stdout, stderr)
	case "client":
		err = cmdClient(ctx, args[1:], stdout, stderr)
	case "token":
		err = cmdToken(ctx, args[1:], stdout, stderr)
	case "worker":
		err = cmdWorker(ctx, args[1:], stdout, stderr)
	case "import":
		err = cmdImport(ctx, args[1:], stdout, stderr)
	case "generate":
		err = cmdGenerate(ctx, args[1:], stdout, stderr)
	case "bench":
		err = cmdBench(ctx, args[1:], stdout, stderr)
	case "version", "--version", "-v":
		fmt.Fprintln(stdout, "kiln", version())
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "kiln: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if err != nil {
		if err == errUsage {
			return 2
		}
		fmt.Fprintln(stderr, "kiln:", err)
		return 1
	}
	return 0
}
