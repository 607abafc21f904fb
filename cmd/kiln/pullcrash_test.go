package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestPullKillNineAnywhere: kiln pull is killed with SIGKILL at random
// points (a random step of the pull, its nth passage — every step where a
// crash leaves a different state on disk), resumed, killed again, … through
// a full pull and two --since-last pulls with creates, updates and deletes
// on the server in between. After each, --verify passes; at the end the
// folder holds exactly what a fresh full pull of the server's state holds,
// resource for resource, byte for byte.
func TestPullKillNineAnywhere(t *testing.T) {
	if testing.Short() {
		t.Skip("fault test")
	}
	bin := buildKiln(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	seedStore(t, bin, dir, 12, 5, []string{"--data", data})
	k := &kilnProc{t: t, bin: bin, args: []string{"--data", data, "--log-level", "error", "--max-file-resources", "400"}}
	k.start()
	defer k.stop()
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 7))
	folder := filepath.Join(dir, "pull")
	// The full pull is killed once at every step, in the order a run passes
	// them (each kill after the first hits a --resume).
	pullWithKills(t, bin, []string{"kicked-off:1", "poll:1", "file-body:1", "file-body:1", "file-done:1", "verified:1",
		"moved:1", "manifested:1"}, folder, "--server", k.base(), "--out", folder)
	for round := range 2 {
		mutateServer(t, k.base(), rng, round)
		// The first incremental pull is killed at every step, the second
		// at a random choice of them; both while they rewrite earlier files
		// (at a random one of them).
		var kills []string
		for _, s := range []string{"kicked-off:1", "poll:1", "file-done:1", "verified:1", "applied:", "moved:1", "manifested:1"} {
			switch {
			case s == "applied:":
				kills = append(kills, fmt.Sprintf("applied:%d", 1+rng.IntN(2)))
			case round == 0 || rng.IntN(2) == 0:
				kills = append(kills, s)
			}
		}
		t.Logf("incremental pull %d killed at %v", round+1, kills)
		pullWithKills(t, bin, kills, folder, "--server", k.base(), "--since-last", folder)
	}
	fresh := filepath.Join(dir, "fresh")
	if out, err := exec.Command(bin, "pull", "--server", k.base(), "--out", fresh).CombinedOutput(); err != nil {
		t.Fatalf("fresh pull: %v\n%s", err, out)
	}
	got, want := folderResources(t, folder), folderResources(t, fresh)
	for key, body := range want {
		if got[key] == nil {
			t.Errorf("%s is missing from the resumed pulls", key)
		} else if !bytes.Equal(got[key], body) {
			t.Errorf("%s differs from the server's:\n got %.200s\nwant %.200s", key, got[key], body)
		}
	}
	for key := range got {
		if want[key] == nil {
			t.Errorf("%s is in the resumed pulls but no longer on the server", key)
		}
	}
	if len(want) == 0 {
		t.Fatal("the fresh pull is empty")
	}
	t.Logf("%d resources", len(want))
}

// pullWithKills runs kiln pull killed at each failpoint of kills in turn
// (step:n, the nth passage of the step), resuming after each; then a run
// without one, which must complete, and --verify must pass. A failpoint the
// pull does not reach is a failure: the crash was meant to happen there.
func pullWithKills(t *testing.T, bin string, kills []string, folder string, args ...string) {
	t.Helper()
	for _, fp := range append(kills, "") {
		cmd := exec.Command(bin, append([]string{"pull"}, args...)...)
		if fp != "" {
			cmd.Env = append(os.Environ(), "KILN_PULL_FAILPOINT="+fp)
		}
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		killed := errors.As(err, &exit) && exit.Sys().(syscall.WaitStatus).Signaled() && exit.Sys().(syscall.WaitStatus).Signal() == syscall.SIGKILL
		switch {
		case killed && fp != "":
			args = []string{"--resume", folder}
		case err != nil:
			t.Fatalf("kiln pull %v (failpoint %q): %v\n%s", args, fp, err, out)
		case fp != "":
			t.Fatalf("kiln pull %v completed without reaching failpoint %s", args, fp)
		}
	}
	if out, err := exec.Command(bin, "pull", "--verify", folder).CombinedOutput(); err != nil {
		t.Fatalf("--verify after the pull: %v\n%s", err, out)
	}
	for _, pattern := range []string{"*.part", "*.tmp", ".kiln-pull-staging"} {
		if left, _ := filepath.Glob(filepath.Join(folder, pattern)); len(left) > 0 {
			t.Errorf("left behind: %v", left)
		}
	}
}

// mutateServer changes the server's data through its REST API: two
// Observations get a new version, two Conditions are deleted, a Patient is
// created, and one Encounter is updated and then deleted.
func mutateServer(t *testing.T, base string, rng *rand.Rand, round int) {
	t.Helper()
	do := func(method, path string, body []byte) []byte {
		t.Helper()
		req, _ := http.NewRequest(method, base+"/"+path, bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/fhir+json")
		req.Header.Set("Accept", "application/fhir+json")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		if res.StatusCode >= 300 {
			t.Fatalf("%s %s: %d %s", method, path, res.StatusCode, b)
		}
		return b
	}
	some := func(typ string, n int) []map[string]any {
		var bundle struct {
			Entry []struct{ Resource map[string]any }
		}
		if err := json.Unmarshal(do(http.MethodGet, fmt.Sprintf("%s?_count=50", typ), nil), &bundle); err != nil {
			t.Fatal(err)
		}
		rng.Shuffle(len(bundle.Entry), func(i, j int) { bundle.Entry[i], bundle.Entry[j] = bundle.Entry[j], bundle.Entry[i] })
		var out []map[string]any
		for _, e := range bundle.Entry[:min(n, len(bundle.Entry))] {
			out = append(out, e.Resource)
		}
		return out
	}
	put := func(r map[string]any) {
		b, _ := json.Marshal(r)
		do(http.MethodPut, fmt.Sprintf("%s/%s", r["resourceType"], r["id"]), b)
	}
	for _, o := range some("Observation", 2) {
		o["status"] = "amended"
		put(o)
	}
	for _, c := range some("Condition", 2) {
		do(http.MethodDelete, fmt.Sprintf("Condition/%s", c["id"]), nil)
	}
	put(map[string]any{"resourceType": "Patient", "id": fmt.Sprintf("crash-test-%d", round), "gender": "unknown"})
	for _, e := range some("Encounter", 1) {
		e["status"] = "cancelled"
		put(e)
		do(http.MethodDelete, fmt.Sprintf("Encounter/%s", e["id"]), nil)
	}
}

// folderResources reads every output line of a pull folder by Type/id; a
// resource twice is a failure.
func folderResources(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	files, _ := filepath.Glob(filepath.Join(dir, "*.ndjson"))
	for _, f := range files {
		if base := filepath.Base(f); strings.HasPrefix(base, "deleted.") || strings.HasPrefix(base, "error.") {
			continue
		}
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(fh)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			var r struct{ ResourceType, ID string }
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			key := r.ResourceType + "/" + r.ID
			if out[key] != nil {
				t.Errorf("%s twice in %s", key, dir)
			}
			out[key] = bytes.Clone(sc.Bytes())
		}
		fh.Close()
	}
	return out
}
