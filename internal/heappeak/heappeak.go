// Package heappeak bounds the Go heap a stretch of code needs, without
// sampling on a clock (a sampler can sleep through the peak, and stops the
// world each time it reads).
//
// It leans on the garbage collector's own pacing: after every cycle the
// runtime sets a heap goal, and the heap does not grow past that goal
// before the next cycle starts. A sentinel object's finalizer runs once per
// cycle and records the goal; the largest goal recorded is an upper bound
// of the heap over the whole stretch (give or take what is allocated while a
// cycle's concurrent mark runs). With GOGC lowered to 10 for the duration,
// the bound is within about 10 % of the live peak.
package heappeak

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
)

// Watch records heap goals from Start to Stop.
type Watch struct {
	mu      sync.Mutex
	base    uint64
	peak    uint64
	stopped bool
	gcPct   int
	cycles  int
}

type sentinel struct {
	w *Watch
	_ [64]byte // large enough not to share a tiny-allocator block, whose finalizer could be delayed
}

// Start collects garbage, notes the live heap as the baseline and starts
// recording. Only one Watch may run at a time in a process (GOGC is global).
func Start() *Watch {
	w := &Watch{gcPct: debug.SetGCPercent(10)}
	runtime.GC()
	w.base = read("/gc/heap/live:bytes")
	w.arm()
	return w
}

func (w *Watch) arm() {
	s := &sentinel{w: w}
	runtime.SetFinalizer(s, func(s *sentinel) { s.w.record(true) })
}

func (w *Watch) record(rearm bool) {
	goal := read("/gc/heap/goal:bytes")
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	w.cycles++
	w.peak = max(w.peak, goal)
	if rearm {
		w.arm()
	}
}

// Stop ends the stretch and returns the bound on heap growth over the
// baseline, in bytes, and the number of GC cycles it saw.
func (w *Watch) Stop() (growth uint64, cycles int) {
	w.record(false) // the goal now in force covers the stretch since the last cycle
	w.mu.Lock()
	w.stopped = true
	peak, n := w.peak, w.cycles
	w.mu.Unlock()
	debug.SetGCPercent(w.gcPct)
	if peak < w.base {
		return 0, n
	}
	return peak - w.base, n
}

func read(name string) uint64 {
	s := []metrics.Sample{{Name: name}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}
