package proc_test

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln/launchertest"
	"github.com/kiln-fhir/kiln/proc"
)

// worker is a stand-in for kiln worker: it records its pid, then waits for
// the test to write the exit code it should end with.
const worker = `#!/bin/sh
# $1=worker $2=--job $3=ID
dir=$(dirname "$0")
echo $$ > "$dir/$3.$$.pid"
while [ ! -f "$dir/$3.end" ]; do sleep 0.02; done
code=$(cat "$dir/$3.end")
rm -f "$dir/$3.$$.pid"
exit $code
`

func TestContract(t *testing.T) {
	launchertest.Run(t, func(t *testing.T) launchertest.Harness {
		dir := t.TempDir()
		bin := filepath.Join(dir, "kiln")
		if err := os.WriteFile(bin, []byte(worker), 0o755); err != nil {
			t.Fatal(err)
		}
		l := proc.New(bin, nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
		l.Workers = 2
		return launchertest.Harness{
			Launcher: l,
			End: func(t *testing.T, job string, ok bool) {
				code := "3"
				if ok {
					code = "0"
				}
				// The end file is consumed by this launch's workers only:
				// removed once none of them is left.
				os.WriteFile(filepath.Join(dir, job+".end.tmp"), []byte(code), 0o644)
				os.Rename(filepath.Join(dir, job+".end.tmp"), filepath.Join(dir, job+".end"))
				for running(t, dir, job) {
					time.Sleep(10 * time.Millisecond) // until this launch's workers read it
				}
				os.Remove(filepath.Join(dir, job+".end"))
			},
			Running: func(t *testing.T, job string) bool { return running(t, dir, job) },
		}
	})
}

// running reports whether a worker process of job is alive (its pid file
// is there and the process answers signal 0).
func running(t *testing.T, dir, job string) bool {
	files, _ := filepath.Glob(filepath.Join(dir, job+".*.pid"))
	for _, f := range files {
		var pid int
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if _, err := fmt.Sscan(strings.TrimSpace(string(b)), &pid); err != nil {
			continue
		}
		// A killed child the launcher has not reaped yet is a zombie: not running.
		if syscall.Kill(pid, 0) == nil && !zombie(pid) {
			return true
		}
		os.Remove(f)
	}
	return false
}

// zombie reports whether pid has exited but not been reaped.
func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	fields := strings.Fields(string(b))
	return len(fields) > 2 && fields[2] == "Z"
}
