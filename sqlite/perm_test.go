package sqlite

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestDatabaseFileOwnerOnly: kiln.db holds health records and is created 0600.
func TestDatabaseFileOwnerOnly(t *testing.T) {
	dir := t.TempDir()
	db, err := Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, name := range []string{"kiln.db", "kiln.db-wal"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if os.IsNotExist(err) && name != "kiln.db" {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", name, fi.Mode().Perm())
		}
	}
}
