package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestLoad runs kiln bench load's driver against a kiln serve process with
// its default limits: 50 clients kicking off exports at once, 200 polling
// them, REST writers and readers, for KILN_LOAD_DURATION (default 10 s).
// Nothing may get a 5xx or go unanswered; the export limits must show as
// 429s; exports must complete; every write must be stored. The latency
// table is logged (docs/operations.md has a longer run's).
func TestLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("load test")
	}
	dur := 10 * time.Second
	if v := os.Getenv("KILN_LOAD_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("KILN_LOAD_DURATION: %v", err)
		}
		dur = d
	}
	ctx := context.Background()
	bin := buildKiln(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	seedStore(t, bin, dir, 40, 17, []string{"--data", data})
	k := &kilnProc{t: t, bin: bin, args: []string{"--data", data, "--log-level", "error"}}
	k.start()
	defer k.stop()
	rep, err := runLoad(ctx, loadConfig{Base: k.base(), Baseline: 2 * time.Second, Duration: dur,
		KickOffs: 50, Pollers: 200, Writers: 4, Readers: 4, PollEvery: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	rep.print(&out)
	t.Logf("load for %s:\n%s", dur, out.String())
	if n := rep.ServerErrors(); n > 0 {
		t.Errorf("%d requests got a 5xx or no answer", n)
	}
	kick, status, write := rep.Classes["export kick-off"], rep.Classes["export status"], rep.Classes["REST write"]
	if kick.count(202, 202) == 0 || kick.count(429, 429) == 0 {
		t.Errorf("kick-offs: want some accepted and some refused with 429 (limits 10 running, 3 per client): %v", kick.statuses)
	}
	// Pollers get 200, 202 or 429 (the poll limit, while an export runs: how
	// many depends on how long exports take, so not counted here).
	if n := status.count(0, 999); n == 0 || status.count(200, 202)+status.count(429, 429) != n {
		t.Errorf("status polls: %v", status.statuses)
	}
	if rep.Completed == 0 {
		t.Errorf("no export completed under load (%d accepted)", rep.Accepted)
	}
	if w := write.count(0, 999); w == 0 || write.count(201, 201) != w {
		t.Errorf("REST writes: %v", write.statuses)
	}
	for _, name := range []string{"REST read, idle", "REST read, exporting"} {
		if c := rep.Classes[name]; c.count(200, 200) == 0 || c.count(200, 200) != c.count(0, 999) {
			t.Errorf("%s: %v", name, c.statuses)
		}
	}
}
