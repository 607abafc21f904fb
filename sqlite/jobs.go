package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/kiln-fhir/kiln"
)

// Unit states.
const (
	unitPending = "pending"
	unitRunning = "running"
	unitDone    = "done"
)

// CreateJob implements kiln.JobStore.
func (db *DB) CreateJob(ctx context.Context, j *kiln.Job, units []kiln.Unit, lim kiln.JobLimits) error {
	doc, err := json.Marshal(j)
	if err != nil {
		return fmt.Errorf("encode job: %w", err)
	}
	return db.inTx(ctx, func(tx *sql.Tx) error {
		// Transactions on the one write connection run one at a time, so
		// the count holds until the insert commits.
		var all, mine int
		if err := tx.QueryRowContext(ctx, `SELECT count(*), coalesce(sum(owner=?), 0) FROM jobs WHERE state IN (?, ?)`,
			j.Owner, string(kiln.JobAccepted), string(kiln.JobInProgress)).Scan(&all, &mine); err != nil {
			return fmt.Errorf("count unfinished jobs: %w", err)
		}
		if err := lim.Check(all, mine); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO jobs(id, owner, state, created, updated, doc) VALUES(?, ?, ?, ?, ?, ?)`,
			j.ID, j.Owner, string(j.State), ms(j.Created), ms(j.Updated), doc); err != nil {
			return fmt.Errorf("insert job: %w", err)
		}
		if db.events != nil {
			if err := insertMessages(ctx, tx, db.events.JobChanged(nil, j)); err != nil {
				return err
			}
		}
		return insertUnits(ctx, tx, units)
	})
}

func insertUnits(ctx context.Context, tx *sql.Tx, units []kiln.Unit) error {
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO units(job, seq, state, spec) VALUES(?, ?, ?, ?)`)
	if err != nil {
		return fmt.Errorf("prepare units: %w", err)
	}
	defer stmt.Close()
	for _, u := range units {
		spec, err := json.Marshal(u)
		if err != nil {
			return fmt.Errorf("encode unit: %w", err)
		}
		if _, err := stmt.ExecContext(ctx, u.Job, u.Seq, unitPending, spec); err != nil {
			return fmt.Errorf("insert unit %d: %w", u.Seq, err)
		}
	}
	return nil
}

// SetPatients implements kiln.JobStore.
func (db *DB) SetPatients(ctx context.Context, job string, ids []string) error {
	return db.inTx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `DELETE FROM job_patients WHERE job=?`, job); err != nil {
			return fmt.Errorf("clear patients: %w", err)
		}
		stmt, err := tx.PrepareContext(ctx, `INSERT INTO job_patients(job, ord, patient) VALUES(?, ?, ?)`)
		if err != nil {
			return fmt.Errorf("prepare patients: %w", err)
		}
		defer stmt.Close()
		for i, id := range ids {
			if _, err := stmt.ExecContext(ctx, job, i, id); err != nil {
				return fmt.Errorf("insert patient: %w", err)
			}
		}
		return nil
	})
}

// GetJob implements kiln.JobStore.
func (db *DB) GetJob(ctx context.Context, id string) (*kiln.Job, error) {
	return readJob(ctx, db.read, id)
}

// readJob reads one job, through the read pool or inside a transaction.
func readJob(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}, id string) (*kiln.Job, error) {
	var doc []byte
	err := q.QueryRowContext(ctx, `SELECT doc FROM jobs WHERE id=?`, id).Scan(&doc)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "export job %s is not known", id)
	}
	if err != nil {
		return nil, fmt.Errorf("read job %s: %w", id, err)
	}
	var j kiln.Job
	if err := json.Unmarshal(doc, &j); err != nil {
		return nil, fmt.Errorf("decode job %s: %w", id, err)
	}
	return &j, nil
}

// UpdateJob implements kiln.JobStore.
func (db *DB) UpdateJob(ctx context.Context, id string, fn func(*kiln.Job) error) (*kiln.Job, error) {
	var out *kiln.Job
	err := db.inTx(ctx, func(tx *sql.Tx) error {
		cur, err := readJob(ctx, tx, id)
		if err != nil {
			return err
		}
		j, old := *cur, *cur // old: the state before fn, for the event
		if err := fn(&j); err != nil {
			return err
		}
		if db.events != nil && old.State != j.State {
			if err := insertMessages(ctx, tx, db.events.JobChanged(&old, &j)); err != nil {
				return err
			}
		}
		j.Updated = db.now().UTC()
		doc, err := json.Marshal(&j)
		if err != nil {
			return fmt.Errorf("encode job: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE jobs SET state=?, updated=?, expires=?, doc=? WHERE id=?`,
			string(j.State), ms(j.Updated), expiresMS(j.Expires), doc, id); err != nil {
			return fmt.Errorf("update job %s: %w", id, err)
		}
		out = &j
		return nil
	})
	return out, err
}

func expiresMS(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return ms(t)
}

// DeleteJob implements kiln.JobStore.
func (db *DB) DeleteJob(ctx context.Context, id string) error {
	return db.inTx(ctx, func(tx *sql.Tx) error {
		for _, q := range []string{`DELETE FROM units WHERE job=?`, `DELETE FROM job_patients WHERE job=?`, `DELETE FROM jobs WHERE id=?`} {
			if _, err := tx.ExecContext(ctx, q, id); err != nil {
				return fmt.Errorf("delete job %s: %w", id, err)
			}
		}
		return nil
	})
}

// Jobs implements kiln.JobStore.
func (db *DB) Jobs(ctx context.Context, states ...kiln.JobState) ([]*kiln.Job, error) {
	q := `SELECT doc FROM jobs`
	var args []any
	if len(states) > 0 {
		q += ` WHERE state IN (` + placeholders(len(states)) + `)`
		for _, s := range states {
			args = append(args, string(s))
		}
	}
	rows, err := db.read.QueryContext(ctx, q+` ORDER BY created`, args...)
	if err != nil {
		return nil, fmt.Errorf("list jobs: %w", err)
	}
	return decodeDocs[kiln.Job](rows, "job")
}

// decodeDocs decodes the JSON doc column of every row into a new T.
func decodeDocs[T any](rows *sql.Rows, what string) ([]*T, error) {
	defer rows.Close()
	var out []*T
	for rows.Next() {
		var doc []byte
		if err := rows.Scan(&doc); err != nil {
			return nil, err
		}
		v := new(T)
		if err := json.Unmarshal(doc, v); err != nil {
			return nil, fmt.Errorf("decode %s: %w", what, err)
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// ClaimUnit implements kiln.JobStore. The write connection is single, so the
// select-then-update is atomic among this process's workers.
func (db *DB) ClaimUnit(ctx context.Context, lease time.Duration) (*kiln.Unit, error) {
	var u *kiln.Unit
	err := db.inTx(ctx, func(tx *sql.Tx) error {
		var job string
		var seq, attempts int
		var spec []byte
		err := tx.QueryRowContext(ctx, `SELECT u.job, u.seq, u.attempts, u.spec FROM units u JOIN jobs j ON j.id=u.job
			WHERE u.state=? AND j.state IN (?, ?) ORDER BY j.created, u.seq LIMIT 1`,
			unitPending, string(kiln.JobAccepted), string(kiln.JobInProgress)).Scan(&job, &seq, &attempts, &spec)
		if errors.Is(err, sql.ErrNoRows) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("find unit: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE units SET state=?, attempts=attempts+1, lease=? WHERE job=? AND seq=?`,
			unitRunning, ms(db.now().Add(lease)), job, seq); err != nil {
			return fmt.Errorf("claim unit: %w", err)
		}
		u = &kiln.Unit{}
		if err := json.Unmarshal(spec, u); err != nil {
			return fmt.Errorf("decode unit: %w", err)
		}
		u.Attempts = attempts + 1
		return nil
	})
	return u, err
}

// FinishUnit implements kiln.JobStore.
func (db *DB) FinishUnit(ctx context.Context, u *kiln.Unit, parts []kiln.Part) (bool, error) {
	res, err := json.Marshal(parts)
	if err != nil {
		return false, fmt.Errorf("encode parts: %w", err)
	}
	var ok bool
	err = db.inTx(ctx, func(tx *sql.Tx) error {
		// A unit of a job that failed or was cancelled meanwhile is not recorded: its files go.
		r, err := tx.ExecContext(ctx, `UPDATE units SET state=?, result=? WHERE job=? AND seq=? AND state=? AND attempts=?
			AND EXISTS (SELECT 1 FROM jobs WHERE id=? AND state IN (?, ?))`,
			unitDone, res, u.Job, u.Seq, unitRunning, u.Attempts, u.Job, string(kiln.JobAccepted), string(kiln.JobInProgress))
		if err != nil {
			return fmt.Errorf("finish unit: %w", err)
		}
		n, _ := r.RowsAffected()
		ok = n == 1
		return nil
	})
	return ok, err
}

// HeartbeatUnit implements kiln.JobStore.
func (db *DB) HeartbeatUnit(ctx context.Context, u *kiln.Unit, lease time.Duration) (kiln.Claim, error) {
	// Only a unit of a running job keeps its lease: that is how a cancel
	// in one process reaches units running in others.
	r, err := db.exec(ctx, `UPDATE units SET lease=? WHERE job=? AND seq=? AND state=? AND attempts=?
		AND EXISTS (SELECT 1 FROM jobs j WHERE j.id=units.job AND j.state IN (?,?))`,
		ms(db.now().Add(lease)), u.Job, u.Seq, unitRunning, u.Attempts, string(kiln.JobAccepted), string(kiln.JobInProgress))
	if err != nil {
		return 0, err
	}
	if n, _ := r.RowsAffected(); n == 1 {
		return kiln.ClaimHeld, nil
	}
	// Not extended: tell a lost claim from a job that stopped running.
	var running int
	if err := db.read.QueryRowContext(ctx, `SELECT count(*) FROM jobs WHERE id=? AND state IN (?,?)`,
		u.Job, string(kiln.JobAccepted), string(kiln.JobInProgress)).Scan(&running); err != nil {
		return 0, fmt.Errorf("sqlite: heartbeat: %w", err)
	}
	if running == 0 {
		return kiln.ClaimGone, nil
	}
	return kiln.ClaimLost, nil
}

// ReleaseUnit implements kiln.JobStore.
func (db *DB) ReleaseUnit(ctx context.Context, u *kiln.Unit) error {
	_, err := db.exec(ctx, `UPDATE units SET state=?, lease=0 WHERE job=? AND seq=? AND state=? AND attempts=?`, unitPending, u.Job, u.Seq, unitRunning, u.Attempts)
	return err
}

// ReleaseExpired implements kiln.JobStore.
func (db *DB) ReleaseExpired(ctx context.Context) (int, error) {
	r, err := db.exec(ctx, `UPDATE units SET state=?, lease=0 WHERE state=? AND lease < ?`, unitPending, unitRunning, ms(db.now()))
	if err != nil {
		return 0, err
	}
	n, _ := r.RowsAffected()
	return int(n), nil
}

// ReleaseAll puts every running unit back to pending. A single embedded
// process calls it at start: whatever was running then died with the process.
func (db *DB) ReleaseAll(ctx context.Context) (int, error) {
	r, err := db.exec(ctx, `UPDATE units SET state=?, lease=0 WHERE state=?`, unitPending, unitRunning)
	if err != nil {
		return 0, err
	}
	n, _ := r.RowsAffected()
	return int(n), nil
}

// UnitCounts returns the number of units of job in all and done.
func (db *DB) UnitCounts(ctx context.Context, job string) (total, done int, err error) {
	err = db.read.QueryRowContext(ctx, `SELECT count(*), coalesce(sum(state=?), 0) FROM units WHERE job=?`, unitDone, job).Scan(&total, &done)
	if err != nil {
		err = fmt.Errorf("count units: %w", err)
	}
	return total, done, err
}

// Parts implements kiln.JobStore.
func (db *DB) Parts(ctx context.Context, job string) ([]kiln.Part, error) {
	rows, err := db.read.QueryContext(ctx, `SELECT result FROM units WHERE job=? AND state=? ORDER BY seq`, job, unitDone)
	if err != nil {
		return nil, fmt.Errorf("list parts: %w", err)
	}
	defer rows.Close()
	var out []kiln.Part
	for rows.Next() {
		var res []byte
		if err := rows.Scan(&res); err != nil {
			return nil, err
		}
		var parts []kiln.Part
		if err := json.Unmarshal(res, &parts); err != nil {
			return nil, fmt.Errorf("decode parts: %w", err)
		}
		out = append(out, parts...)
	}
	return out, rows.Err()
}

// Running implements kiln.JobStore.
func (db *DB) Running(ctx context.Context, owner string) (all, mine int, err error) {
	err = db.read.QueryRowContext(ctx, `SELECT count(*), coalesce(sum(owner=?), 0) FROM jobs WHERE state IN (?, ?)`,
		owner, string(kiln.JobAccepted), string(kiln.JobInProgress)).Scan(&all, &mine)
	if err != nil {
		err = fmt.Errorf("count running jobs: %w", err)
	}
	return all, mine, err
}

func (db *DB) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := db.write.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

func (db *DB) exec(ctx context.Context, q string, args ...any) (sql.Result, error) {
	r, err := db.write.ExecContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("exec: %w", err)
	}
	return r, nil
}

var _ kiln.JobStore = (*DB)(nil)
