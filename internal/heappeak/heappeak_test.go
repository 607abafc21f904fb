package heappeak

import (
	"runtime"
	"testing"
)

var keep [][]byte

// TestBoundCoversAShortSpike: 64 MB held for a moment and then let go,
// with much churn after it (whose GC cycles bring the heap goal back down),
// is still seen; 1 MB of churn is not taken for more.
func TestBoundCoversAShortSpike(t *testing.T) {
	w := Start()
	for range 64 {
		keep = append(keep, make([]byte, 1<<20))
	}
	keep = nil
	for range 200_000 {
		keep = append(keep[:0], make([]byte, 1<<10))
	}
	keep = nil
	growth, cycles := w.Stop()
	if growth < 60<<20 {
		t.Errorf("a 64 MB spike: bound %d MB", growth>>20)
	}
	if cycles == 0 {
		t.Error("no GC cycle recorded")
	}
	runtime.GC()
	w = Start()
	for range 1000 {
		b := make([]byte, 1<<10)
		keep = append(keep[:0], b)
	}
	keep = nil
	if growth, _ := w.Stop(); growth > 8<<20 {
		t.Errorf("1 MB of churn: bound %d MB", growth>>20)
	}
}
