package sqlite_test

import (
	"context"
	"database/sql"
	"path/filepath"
	"testing"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/sqlite"
	"github.com/kiln-fhir/kiln/storetest"
)

// TestUpgradeCompartmentSince: a database made before compartment.since
// existed opens, its memberships count from the beginning, and patient
// exports work on it.
func TestUpgradeCompartmentSince(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	old, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "kiln.db"))
	if err != nil {
		t.Fatal(err)
	}
	for _, stmt := range []string{
		`CREATE TABLE compartment(patient TEXT NOT NULL, type TEXT NOT NULL, rid INTEGER NOT NULL, PRIMARY KEY(patient, type, rid)) WITHOUT ROWID`,
		`INSERT INTO compartment VALUES('a', 'Observation', 99)`,
	} {
		if _, err := old.Exec(stmt); err != nil {
			t.Fatal(err)
		}
	}
	old.Close()
	db, err := sqlite.Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Write(ctx, []kiln.Write{
		storetest.Put(t, `{"resourceType":"Patient","id":"a"}`),
		storetest.Put(t, `{"resourceType":"Observation","id":"o","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/a"}}`),
	}); err != nil {
		t.Fatal(err)
	}
	snap, err := db.SnapshotTime(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.SetPatients(ctx, "j", []string{"a"}); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := db.Scan(ctx, kiln.ScanQuery{Type: "Observation", Snapshot: snap, Job: "j"}, func([]byte) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("observations of a after the upgrade: %d, want 1", n)
	}
	// The old row counts from the beginning: since 0.
	raw, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "kiln.db")+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	var since int64
	if err := raw.QueryRow(`SELECT since FROM compartment WHERE patient='a' AND rid=99`).Scan(&since); err != nil || since != 0 {
		t.Fatalf("old membership: since=%d err=%v", since, err)
	}
}
