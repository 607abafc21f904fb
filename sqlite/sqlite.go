// Package sqlite is Kiln's embedded store: resources, history, tombstones,
// the patient-compartment and access-code indexes, and export jobs, in one
// SQLite database (WAL mode, pure Go driver).
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/kiln-fhir/kiln"
	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// DB is an open Kiln database. Writes are serialized in-process by mu, which
// also guards the lastUpdated clock; reads run concurrently on their own pool.
type DB struct {
	path  string
	write *sql.DB
	read  *sql.DB

	mu sync.Mutex
	// floor is the smallest lastUpdated (ms) the next write may take; it never goes down.
	floor int64
	// nextRID is the next resource row id (0: read it from the table); guarded by mu.
	nextRID int64
	now     func() time.Time
	// events, when set, makes the outbox messages written with each change.
	events kiln.Events
}

var schema = []string{
	`CREATE TABLE IF NOT EXISTS resources(
		rid INTEGER PRIMARY KEY,
		type TEXT NOT NULL,
		id TEXT NOT NULL,
		version INTEGER NOT NULL,
		lu INTEGER NOT NULL,
		deleted INTEGER NOT NULL DEFAULT 0,
		hash BLOB,
		body BLOB)`,
	`CREATE UNIQUE INDEX IF NOT EXISTS resources_type_id ON resources(type, id)`,
	`CREATE INDEX IF NOT EXISTS resources_type_lu ON resources(type, lu)`,
	`CREATE TABLE IF NOT EXISTS history(
		type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
		lu INTEGER NOT NULL, deleted INTEGER NOT NULL, body BLOB,
		PRIMARY KEY(type, id, version))`,
	// supporting: patient → non-compartment resources their data references (or that
	// reference them). Rows are never removed on update: a stale row can only add a
	// Practitioner or Organization to an export, never lose data.
	// Kept for tombstones too, so an export as of an earlier snapshot still finds them.
	// compartment: the patients whose compartment a resource is in now, each
	// since the lastUpdated of the version that put it there. compartment_gone
	// keeps the memberships a later version ended (until: that version's
	// lastUpdated), so a patient export reads the compartment as of its snapshot.
	`CREATE TABLE IF NOT EXISTS compartment(
		patient TEXT NOT NULL, type TEXT NOT NULL, rid INTEGER NOT NULL, since INTEGER NOT NULL DEFAULT 0,
		PRIMARY KEY(patient, type, rid)) WITHOUT ROWID`,
	`CREATE TABLE IF NOT EXISTS compartment_gone(
		patient TEXT NOT NULL, type TEXT NOT NULL, rid INTEGER NOT NULL, since INTEGER NOT NULL, until INTEGER NOT NULL,
		PRIMARY KEY(patient, type, rid, until)) WITHOUT ROWID`,
	`CREATE INDEX IF NOT EXISTS compartment_gone_rid ON compartment_gone(rid)`,
	`CREATE TABLE IF NOT EXISTS supporting(
		patient TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL,
		PRIMARY KEY(patient, type, id)) WITHOUT ROWID`,
	`CREATE TABLE IF NOT EXISTS access(
		code TEXT NOT NULL, rid INTEGER NOT NULL, PRIMARY KEY(code, rid)) WITHOUT ROWID`,
	`CREATE INDEX IF NOT EXISTS access_rid ON access(rid)`,
	`CREATE TABLE IF NOT EXISTS jobs(
		id TEXT PRIMARY KEY,
		owner TEXT NOT NULL,
		state TEXT NOT NULL,
		created INTEGER NOT NULL,
		updated INTEGER NOT NULL,
		expires INTEGER NOT NULL DEFAULT 0,
		doc BLOB NOT NULL)`,
	`CREATE TABLE IF NOT EXISTS units(
		job TEXT NOT NULL, seq INTEGER NOT NULL,
		state TEXT NOT NULL,
		spec BLOB NOT NULL,
		result BLOB,
		attempts INTEGER NOT NULL DEFAULT 0,
		lease INTEGER NOT NULL DEFAULT 0,
		PRIMARY KEY(job, seq))`,
	`CREATE INDEX IF NOT EXISTS units_state ON units(state, job)`,
	`CREATE TABLE IF NOT EXISTS job_patients(
		job TEXT NOT NULL, ord INTEGER NOT NULL, patient TEXT NOT NULL,
		PRIMARY KEY(job, ord)) WITHOUT ROWID`,
	`CREATE INDEX IF NOT EXISTS job_patients_patient ON job_patients(job, patient)`,
	`CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)`,
	`CREATE TABLE IF NOT EXISTS clients(id TEXT PRIMARY KEY, doc BLOB NOT NULL)`,
	// Stored ViewDefinitions (SQL on FHIR), not R4 resources.
	`CREATE TABLE IF NOT EXISTS views(id TEXT PRIMARY KEY, version INTEGER NOT NULL, updated INTEGER NOT NULL, body BLOB NOT NULL)`,
	// Client assertions already used, until they expire (replay protection).
	`CREATE TABLE IF NOT EXISTS assertions(key TEXT PRIMARY KEY, expires INTEGER NOT NULL)`,
	`CREATE TABLE IF NOT EXISTS outbox(
		seq INTEGER PRIMARY KEY AUTOINCREMENT,
		topic TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, headers BLOB)`,
}

// Open opens (creating if needed) the database in dir.
func Open(ctx context.Context, dir string) (*DB, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data folder: %w", err)
	}
	path := filepath.Join(dir, "kiln.db")
	// Health records: the database is created owner-only (SQLite gives its
	// -wal and -shm files the same mode), whatever the umask.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create database file: %w", err)
	}
	f.Close()
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_pragma=busy_timeout(10000)&_pragma=foreign_keys(OFF)&_pragma=cache_size(-32768)&_txlock=immediate"
	w, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	w.SetMaxOpenConns(1)
	w.SetConnMaxIdleTime(0)
	for _, stmt := range schema {
		if _, err := w.ExecContext(ctx, stmt); err != nil {
			w.Close()
			return nil, fmt.Errorf("create schema: %w", err)
		}
	}
	if err := upgrade(ctx, w); err != nil {
		w.Close()
		return nil, err
	}
	r, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)&_pragma=query_only(1)&_pragma=cache_size(-8192)")
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("open %s for reading: %w", path, err)
	}
	r.SetMaxOpenConns(2 * runtime.NumCPU())
	db := &DB{path: path, write: w, read: r, now: time.Now}
	var maxLU sql.NullInt64
	if err := w.QueryRowContext(ctx, `SELECT max(lu) FROM resources`).Scan(&maxLU); err != nil {
		db.Close()
		return nil, fmt.Errorf("read clock: %w", err)
	}
	var floor sql.NullString
	_ = w.QueryRowContext(ctx, `SELECT value FROM meta WHERE key='floor'`).Scan(&floor)
	db.floor = maxLU.Int64 + 1
	if floor.Valid {
		var f int64
		if _, err := fmt.Sscan(floor.String, &f); err == nil && f > db.floor {
			db.floor = f
		}
	}
	return db, nil
}

// upgrade brings a database made by an earlier Kiln to the current schema.
func upgrade(ctx context.Context, w *sql.DB) error {
	// Memberships indexed before compartment.since existed count from the
	// beginning: what an export found before, it finds still.
	var n int
	if err := w.QueryRowContext(ctx, `SELECT count(*) FROM pragma_table_info('compartment') WHERE name='since'`).Scan(&n); err != nil {
		return fmt.Errorf("read schema: %w", err)
	}
	if n == 0 {
		if _, err := w.ExecContext(ctx, `ALTER TABLE compartment ADD COLUMN since INTEGER NOT NULL DEFAULT 0`); err != nil {
			return fmt.Errorf("upgrade schema: %w", err)
		}
	}
	// The by-row index holds since, so the lowest-ordinal check of a patient
	// export reads no table rows; it replaces the earlier compartment_rid.
	for _, stmt := range []string{
		`CREATE INDEX IF NOT EXISTS compartment_rid_since ON compartment(rid, since)`,
		`DROP INDEX IF EXISTS compartment_rid`,
	} {
		if _, err := w.ExecContext(ctx, stmt); err != nil {
			return fmt.Errorf("upgrade schema: %w", err)
		}
	}
	return nil
}

// Close closes the database.
func (db *DB) Close() error {
	return errors.Join(db.read.Close(), db.write.Close())
}

// Ping checks that the database answers a query.
func (db *DB) Ping(ctx context.Context) error {
	var one int
	if err := db.read.QueryRowContext(ctx, `SELECT 1`).Scan(&one); err != nil {
		return fmt.Errorf("sqlite: ping: %w", err)
	}
	return nil
}

// Path is the database file.
func (db *DB) Path() string { return db.path }

// tick returns the lastUpdated for a write starting now. Caller holds mu.
func (db *DB) tick() int64 {
	lu := db.now().UnixMilli()
	if lu < db.floor {
		lu = db.floor
	}
	return lu
}

// SnapshotTime implements kiln.ResourceStore. Writes are serialized by mu, so
// every committed write has lastUpdated ≤ T, and the floor makes later ones > T.
// The floor is persisted so that a restart cannot hand out a time ≤ T again.
func (db *DB) SnapshotTime(ctx context.Context) (time.Time, error) {
	db.mu.Lock()
	defer db.mu.Unlock()
	t := db.tick()
	if _, err := db.write.ExecContext(ctx, `INSERT INTO meta(key, value) VALUES('floor', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value`, fmt.Sprint(t+1)); err != nil {
		return time.Time{}, fmt.Errorf("record snapshot: %w", err)
	}
	db.floor = t + 1
	return time.UnixMilli(t).UTC(), nil
}

func ms(t time.Time) int64 { return t.UnixMilli() }

func fromMS(v int64) time.Time { return time.UnixMilli(v).UTC() }
