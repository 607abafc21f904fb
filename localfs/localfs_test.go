package localfs

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/sinktest"
)

func TestSinkRoundTripAndConfinement(t *testing.T) {
	ctx := context.Background()
	s, err := New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	w, err := s.Create(ctx, "job", "000001-a.ndjson", kiln.WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "line\n")
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := s.Open(ctx, "job", "000001-a.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(r)
	r.Close()
	if string(b) != "line\n" {
		t.Fatalf("read %q", b)
	}
	// Export files are health records: owner-only, whatever the umask.
	if fi, err := os.Stat(filepath.Join(s.Root, "job", "000001-a.ndjson")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("export file mode: %v %v", fi.Mode(), err)
	}
	for _, bad := range [][2]string{{"..", "x"}, {"job", "../../etc/passwd"}, {"a/b", "x"}, {"job", ""}} {
		if _, err := s.Open(ctx, bad[0], bad[1]); kiln.ErrorCode(err) != kiln.ENOTFOUND {
			t.Errorf("Open(%q, %q): %v", bad[0], bad[1], err)
		}
	}
	if err := s.RemovePrefix(ctx, "job", "000001-"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Open(ctx, "job", "000001-a.ndjson"); kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("after RemovePrefix: %v", err)
	}
	if err := s.RemoveJob(ctx, "job"); err != nil {
		t.Fatal(err)
	}
}

func TestContract(t *testing.T) {
	sinktest.Run(t, func(t *testing.T) kiln.Sink {
		s, err := New(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		return s
	}, sinktest.Options{})
}
