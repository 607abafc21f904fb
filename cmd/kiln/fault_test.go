package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln/synth"
)

// TestKillNineDuringExport kills kiln serve with SIGKILL at random moments of
// an export, again and again, restarting it on the same data folder each
// time; the export then completes with exactly the store's resources, none
// twice and none torn.
func TestKillNineDuringExport(t *testing.T) {
	if testing.Short() {
		t.Skip("fault test")
	}
	bin := buildKiln(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	gen := filepath.Join(dir, "gen")
	if _, err := synth.Generate(context.Background(), gen, synth.Options{Patients: 150, Seed: 9}); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "import", "--quiet", "--data", data, gen).CombinedOutput(); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	start := func() *exec.Cmd {
		cmd := exec.Command(bin, "serve", "--data", data, "--addr", addr, "--export-unit-size", "1500", "--log-level", "error")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if res, err := http.Get("http://" + addr + "/readyz"); err == nil {
				res.Body.Close()
				return cmd
			}
			if time.Now().After(deadline) {
				t.Fatal("kiln serve did not start")
			}
		}
	}
	srv := start()
	defer func() { srv.Process.Kill(); srv.Wait() }()
	base := "http://" + addr + "/4_0_0"
	locs := []string{}
	for _, path := range []string{"/$export?fetchResourceBatchSize=50", "/Patient/$export?patientReferenceBatchSize=5&fetchResourceBatchSize=50"} {
		res, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != 202 {
			t.Fatalf("kick-off: %d", res.StatusCode)
		}
		locs = append(locs, res.Header.Get("Content-Location"))
	}
	rng := rand.New(rand.NewPCG(1, 2))
	kills := 0
	for range 6 {
		time.Sleep(time.Duration(50+rng.IntN(400)) * time.Millisecond)
		srv.Process.Signal(syscall.SIGKILL)
		srv.Wait()
		kills++
		srv = start()
	}
	for _, loc := range locs {
		var m struct{ Output []struct{ Type, URL string } }
		for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(50 * time.Millisecond) {
			res, err := http.Get(loc)
			if err != nil {
				t.Fatal(err)
			}
			if res.StatusCode == 200 {
				json.NewDecoder(res.Body).Decode(&m)
				res.Body.Close()
				break
			}
			res.Body.Close()
			if res.StatusCode != 202 || time.Now().After(deadline) {
				t.Fatalf("%s after %d kills: status %d", loc, kills, res.StatusCode)
			}
		}
		ids := map[string][]string{}
		for _, o := range m.Output {
			res, err := http.Get(o.URL)
			if err != nil {
				t.Fatal(err)
			}
			sc := bufio.NewScanner(res.Body)
			sc.Buffer(make([]byte, 1<<20), 16<<20)
			for sc.Scan() {
				var r struct{ ResourceType, ID string }
				if err := json.Unmarshal(sc.Bytes(), &r); err != nil || r.ResourceType != o.Type {
					t.Fatalf("torn or misplaced line in %s: %v %.80s", o.Type, err, sc.Text())
				}
				ids[o.Type] = append(ids[o.Type], r.ID)
			}
			res.Body.Close()
		}
		total := 0
		for typ, list := range ids {
			if n := len(slices.Compact(slices.Sorted(slices.Values(list)))); n != len(list) {
				t.Errorf("%s: %s has %d lines for %d distinct ids", loc, typ, len(list), n)
			}
			total += len(list)
		}
		want := countLines(t, gen)
		if total != want {
			t.Errorf("%s after %d kills: %d resources, generated %d", loc, kills, total, want)
		}
	}
}

func countLines(t *testing.T, dir string) int {
	files, _ := filepath.Glob(filepath.Join(dir, "*.ndjson"))
	n := 0
	for _, f := range files {
		out, err := exec.Command("wc", "-l", f).Output()
		if err != nil {
			t.Fatal(err)
		}
		var c int
		fmt.Sscan(string(out), &c)
		n += c
	}
	return n
}
