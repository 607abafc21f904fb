package pull

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestRunIDsNeverCollide: a second run started in the same second as the
// previous one gets its own name (once it overwrote the first run's files).
func TestRunIDsNeverCollide(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	first := newRunID(dir, now)
	os.WriteFile(filepath.Join(dir, "Patient."+first+".001.ndjson"), nil, 0o644)
	second := newRunID(dir, now.Add(300*time.Millisecond))
	os.WriteFile(filepath.Join(dir, "deleted."+second+".001.ndjson"), nil, 0o644)
	third := newRunID(dir, now.Add(600*time.Millisecond))
	if first != "20261127T100000" || second != first+"-2" || third != first+"-3" {
		t.Fatalf("run ids %q %q %q", first, second, third)
	}
	if got := newRunID(dir, now.Add(time.Second)); got != "20261127T100001" {
		t.Fatalf("next second: %q", got)
	}
}
