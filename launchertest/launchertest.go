// Package launchertest is the contract every kiln.Launcher must meet: one
// suite, run against each implementation (local processes, Kubernetes
// Jobs). The in-process "launcher" is no Launcher at all: the API server's
// own workers run the units.
package launchertest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
)

// Harness is a launcher with the means to play its workers' part.
type Harness struct {
	Launcher kiln.Launcher
	// End makes the workers of the job's latest launch end, successfully or not.
	End func(t *testing.T, job string, ok bool)
	// Running reports whether the job has workers that have not ended.
	Running func(t *testing.T, job string) bool
	// Watching, if set, waits until the launcher's Watch is listening, for
	// launchers that report only what happens after that.
	Watching func(t *testing.T)
}

// Run runs the contract; open makes a fresh harness for each subtest.
func Run(t *testing.T, open func(t *testing.T) Harness) {
	tests := []struct {
		name string
		fn   func(t *testing.T, h Harness, ev *events)
	}{
		{"SucceededLaunchIsReported", testSucceeded},
		{"FailedLaunchIsReported", testFailed},
		{"StopEndsTheWorkers", testStop},
		{"EventsNameTheirLaunch", testRelaunch},
		{"JobsAreKeptApart", testApart},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := open(t)
			ev := watch(t, h.Launcher)
			if h.Watching != nil {
				h.Watching(t)
			}
			tt.fn(t, h, ev)
		})
	}
}

// events collects what Watch reports.
type events struct {
	mu   sync.Mutex
	seen []kiln.LaunchEvent
	more chan struct{}
}

func watch(t *testing.T, l kiln.Launcher) *events {
	ev := &events{more: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.Watch(ctx, func(e kiln.LaunchEvent) {
			ev.mu.Lock()
			ev.seen = append(ev.seen, e)
			ev.mu.Unlock()
			select {
			case ev.more <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(func() { cancel(); <-done })
	return ev
}

// await returns the first event of job's launch n, failing after a minute.
func (ev *events) await(t *testing.T, job string, n int) kiln.LaunchEvent {
	t.Helper()
	deadline := time.After(time.Minute)
	for {
		ev.mu.Lock()
		for _, e := range ev.seen {
			if e.Job == job && e.Launch == n {
				ev.mu.Unlock()
				return e
			}
		}
		ev.mu.Unlock()
		select {
		case <-ev.more:
		case <-deadline:
			t.Fatalf("no event for launch %d of %s (seen %+v)", n, job, ev.all())
		case <-time.After(50 * time.Millisecond): // Watch may report through a reconnect
		}
	}
}

func (ev *events) all() []kiln.LaunchEvent {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	return append([]kiln.LaunchEvent(nil), ev.seen...)
}

func jobID(t *testing.T, suffix string) string {
	return strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(fmt.Sprintf("job-%s-%s", t.Name(), suffix)))
}

func launch(t *testing.T, h Harness, id string, n int) *kiln.Job {
	t.Helper()
	j := &kiln.Job{ID: id, State: kiln.JobInProgress, Launches: n}
	if err := h.Launcher.Launch(context.Background(), j); err != nil {
		t.Fatalf("launch %d of %s: %v", n, id, err)
	}
	eventually(t, "workers of "+id+" running", func() bool { return h.Running(t, id) })
	return j
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
	}
}

func testSucceeded(t *testing.T, h Harness, ev *events) {
	id := jobID(t, "a")
	launch(t, h, id, 1)
	h.End(t, id, true)
	if e := ev.await(t, id, 1); e.Outcome != "succeeded" {
		t.Fatalf("event %+v, want succeeded", e)
	}
}

func testFailed(t *testing.T, h Harness, ev *events) {
	id := jobID(t, "a")
	launch(t, h, id, 1)
	h.End(t, id, false)
	if e := ev.await(t, id, 1); e.Outcome != "failed" || e.Reason == "" {
		t.Fatalf("event %+v, want failed with a reason", e)
	}
}

// testStop: Stop ends the workers; whatever is reported of that launch is
// not a success (the coordinator must not finish an export on it).
func testStop(t *testing.T, h Harness, ev *events) {
	id := jobID(t, "a")
	launch(t, h, id, 1)
	if err := h.Launcher.Stop(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	eventually(t, "workers of "+id+" gone after Stop", func() bool { return !h.Running(t, id) })
	if err := h.Launcher.Stop(context.Background(), id); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	for _, e := range ev.all() {
		if e.Job == id && e.Outcome == "succeeded" {
			t.Fatalf("a stopped launch reported %+v", e)
		}
	}
}

// testRelaunch: each launch's end is reported with its own number, so the
// coordinator can tell a stale event of an earlier launch.
func testRelaunch(t *testing.T, h Harness, ev *events) {
	id := jobID(t, "a")
	launch(t, h, id, 1)
	h.End(t, id, false)
	if e := ev.await(t, id, 1); e.Outcome != "failed" {
		t.Fatalf("launch 1: %+v", e)
	}
	eventually(t, "launch 1 ended", func() bool { return !h.Running(t, id) })
	launch(t, h, id, 2)
	h.End(t, id, true)
	if e := ev.await(t, id, 2); e.Outcome != "succeeded" {
		t.Fatalf("launch 2: %+v", e)
	}
}

// testApart: ending or stopping one job's workers leaves another's running.
func testApart(t *testing.T, h Harness, ev *events) {
	a, b := jobID(t, "a"), jobID(t, "b")
	launch(t, h, a, 1)
	launch(t, h, b, 1)
	h.End(t, a, true)
	ev.await(t, a, 1)
	if err := h.Launcher.Stop(context.Background(), a); err != nil {
		t.Fatal(err)
	}
	if !h.Running(t, b) {
		t.Fatal("another job's workers ended")
	}
	h.End(t, b, true)
	if e := ev.await(t, b, 1); e.Outcome != "succeeded" {
		t.Fatalf("job b: %+v", e)
	}
}
