// Package postgres is Kiln's store for scale: resources, history, indexes,
// export jobs and the event outbox in PostgreSQL (pgx), shared by any number
// of Kiln processes — API servers and export workers alike.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/kiln-fhir/kiln"
)

// DB is a Kiln store on PostgreSQL.
type DB struct {
	pool   *pgxpool.Pool
	events kiln.Events
	// now, when set, replaces the database's clock for lastUpdated and
	// snapshots (tests pin it to stamp writes at chosen instants).
	now func() time.Time
}

// Options tune Open.
type Options struct {
	// Schema, if set, is created if missing and used for all tables.
	Schema string
	// MaxConns caps the pool (default: pgxpool's).
	MaxConns int32
}

// Open connects to url and applies the schema migrations.
func Open(ctx context.Context, url string, opt Options) (*DB, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("postgres: parse URL: %w", err)
	}
	if opt.MaxConns > 0 {
		cfg.MaxConns = opt.MaxConns
	}
	if opt.Schema != "" {
		cfg.ConnConfig.RuntimeParams["search_path"] = opt.Schema
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: connect: %w", err)
	}
	db := &DB{pool: pool}
	if err := db.migrate(ctx, opt.Schema); err != nil {
		pool.Close()
		return nil, err
	}
	return db, nil
}

// Close closes the pool.
func (db *DB) Close() error {
	db.pool.Close()
	return nil
}

// SetEvents makes the store write outbox messages with each change. Call it before use.
func (db *DB) SetEvents(e kiln.Events) { db.events = e }

// Ping checks the connection (for /readyz).
func (db *DB) Ping(ctx context.Context) error { return db.pool.Ping(ctx) }

// migrations are applied in order, each once, under an advisory lock so that
// several processes starting together do not race.
var migrations = []string{
	`CREATE TABLE resources(
		rid BIGSERIAL PRIMARY KEY,
		type TEXT NOT NULL,
		id TEXT NOT NULL,
		version BIGINT NOT NULL,
		lu BIGINT NOT NULL,
		deleted BOOLEAN NOT NULL DEFAULT false,
		hash BYTEA,
		body BYTEA,
		UNIQUE(type, id));
	CREATE INDEX resources_type_lu ON resources(type, lu, rid);
	CREATE TABLE history(
		type TEXT NOT NULL, id TEXT NOT NULL, version BIGINT NOT NULL,
		lu BIGINT NOT NULL, deleted BOOLEAN NOT NULL, body BYTEA,
		PRIMARY KEY(type, id, version));
	CREATE TABLE compartment(
		patient TEXT NOT NULL, type TEXT NOT NULL, rid BIGINT NOT NULL,
		PRIMARY KEY(patient, type, rid));
	CREATE INDEX compartment_rid ON compartment(rid, patient);
	CREATE TABLE supporting(
		patient TEXT NOT NULL, type TEXT NOT NULL, id TEXT NOT NULL,
		PRIMARY KEY(patient, type, id));
	CREATE TABLE access(
		code TEXT NOT NULL, rid BIGINT NOT NULL, PRIMARY KEY(code, rid));
	CREATE INDEX access_rid ON access(rid);
	CREATE TABLE jobs(
		id TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL,
		created BIGINT NOT NULL, updated BIGINT NOT NULL, expires BIGINT NOT NULL DEFAULT 0,
		doc JSONB NOT NULL);
	CREATE TABLE units(
		job TEXT NOT NULL, seq INT NOT NULL, state TEXT NOT NULL,
		spec JSONB NOT NULL, result JSONB,
		attempts INT NOT NULL DEFAULT 0, lease BIGINT NOT NULL DEFAULT 0,
		PRIMARY KEY(job, seq));
	CREATE INDEX units_state ON units(state, job);
	CREATE TABLE job_patients(
		job TEXT NOT NULL, ord INT NOT NULL, patient TEXT NOT NULL,
		PRIMARY KEY(job, ord));
	CREATE INDEX job_patients_patient ON job_patients(job, patient, ord);
	CREATE TABLE outbox(
		seq BIGSERIAL PRIMARY KEY, topic TEXT NOT NULL, key TEXT NOT NULL,
		value BYTEA NOT NULL, headers JSONB);
	-- The clock: one row whose lock orders writes against snapshots.
	CREATE TABLE clock(one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one), floor BIGINT NOT NULL);
	INSERT INTO clock(floor) VALUES (0);`,
	`CREATE TABLE clients(id TEXT PRIMARY KEY, doc JSONB NOT NULL);`,
	// Client assertions already used, until they expire (replay protection).
	`CREATE TABLE assertions(key TEXT PRIMARY KEY, expires BIGINT NOT NULL);`,
	// Leadership of maintenance roles among processes (kiln.Elector).
	`CREATE TABLE leaders(name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires BIGINT NOT NULL);`,
	// The compartment as of a snapshot: each membership's since (0 for rows
	// indexed before: they count from the beginning), and the memberships a
	// later version ended, with the lastUpdated that ended them.
	`ALTER TABLE compartment ADD COLUMN since BIGINT NOT NULL DEFAULT 0;
	CREATE TABLE compartment_gone(
		patient TEXT NOT NULL, type TEXT NOT NULL, rid BIGINT NOT NULL, since BIGINT NOT NULL, until BIGINT NOT NULL,
		PRIMARY KEY(patient, type, rid, until));
	CREATE INDEX compartment_gone_rid ON compartment_gone(rid, patient);`,
	// Stored ViewDefinitions (SQL on FHIR), not R4 resources.
	`CREATE TABLE views(id TEXT PRIMARY KEY, version BIGINT NOT NULL, updated BIGINT NOT NULL, body BYTEA NOT NULL);`,
	// Secrets the processes sharing the store agree on (kiln.SecretStore).
	`CREATE TABLE secrets(name TEXT PRIMARY KEY, value BYTEA NOT NULL);`,
}

const migrationLock = 0x6b696c6e // "kiln"

func (db *DB) migrate(ctx context.Context, schema string) error {
	conn, err := db.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("postgres: acquire: %w", err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock($1)`, migrationLock); err != nil {
		return fmt.Errorf("postgres: lock for migrations: %w", err)
	}
	defer conn.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, migrationLock)
	if schema != "" {
		if _, err := conn.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgx.Identifier{schema}.Sanitize()); err != nil {
			return fmt.Errorf("postgres: create schema: %w", err)
		}
	}
	if _, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations(version INT PRIMARY KEY, applied TIMESTAMPTZ NOT NULL DEFAULT now())`); err != nil {
		return fmt.Errorf("postgres: migrations table: %w", err)
	}
	var have int
	if err := conn.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM schema_migrations`).Scan(&have); err != nil {
		return fmt.Errorf("postgres: read migrations: %w", err)
	}
	for v := have + 1; v <= len(migrations); v++ {
		tx, err := conn.Begin(ctx)
		if err != nil {
			return fmt.Errorf("postgres: migration %d: %w", v, err)
		}
		if _, err := tx.Exec(ctx, migrations[v-1]); err != nil {
			tx.Rollback(ctx)
			return fmt.Errorf("postgres: migration %d: %w", v, err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO schema_migrations(version) VALUES($1)`, v); err != nil {
			tx.Rollback(ctx)
			return fmt.Errorf("postgres: migration %d: %w", v, err)
		}
		if err := tx.Commit(ctx); err != nil {
			return fmt.Errorf("postgres: migration %d: %w", v, err)
		}
	}
	return nil
}

func (db *DB) inTx(ctx context.Context, fn func(pgx.Tx) error) error {
	tx, err := db.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("postgres: begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if err := fn(tx); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("postgres: commit: %w", err)
	}
	return nil
}

// dbNow is the database's clock in milliseconds: the same for every process.
const dbNow = `(extract(epoch from clock_timestamp()) * 1000)::bigint`

// tick takes the clock row's lock for the rest of tx and returns the write's
// lastUpdated. Writers serialize on this row; SnapshotTime takes it too, so a
// snapshot waits for writes in flight and sees them committed.
func (db *DB) tick(ctx context.Context, tx pgx.Tx) (int64, error) {
	var lu int64
	err := tx.QueryRow(ctx, `UPDATE clock SET floor = GREATEST(floor, COALESCE($1::bigint, `+dbNow+`)) RETURNING floor`, db.pinned()).Scan(&lu)
	if err != nil {
		return 0, fmt.Errorf("postgres: clock: %w", err)
	}
	return lu, nil
}

// SnapshotTime implements kiln.ResourceStore.
func (db *DB) SnapshotTime(ctx context.Context) (time.Time, error) {
	var t int64
	err := db.pool.QueryRow(ctx, `UPDATE clock SET floor = GREATEST(floor, COALESCE($1::bigint, `+dbNow+`)) + 1 RETURNING floor - 1`, db.pinned()).Scan(&t)
	if err != nil {
		return time.Time{}, fmt.Errorf("postgres: snapshot: %w", err)
	}
	return fromMS(t), nil
}

// SetClock pins the lastUpdated clock to now (tests); nil gives it back to
// the database. Leases keep the database's clock.
func (db *DB) SetClock(now func() time.Time) { db.now = now }

// pinned is the pinned clock's reading in milliseconds, or nil for the database's.
func (db *DB) pinned() any {
	if db.now == nil {
		return nil
	}
	return db.now().UnixMilli()
}

func ms(t time.Time) int64 { return t.UnixMilli() }

func fromMS(v int64) time.Time { return time.UnixMilli(v).UTC() }

func notFound(err error) bool { return errors.Is(err, pgx.ErrNoRows) }

// DropSchema removes a schema and everything in it (tests and benchmarks clean up with it).
func DropSchema(ctx context.Context, url, schema string) error {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return fmt.Errorf("postgres: connect: %w", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `DROP SCHEMA IF EXISTS `+pgx.Identifier{schema}.Sanitize()+` CASCADE`); err != nil {
		return fmt.Errorf("postgres: drop schema %s: %w", schema, err)
	}
	return nil
}
