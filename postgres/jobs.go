package postgres

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kiln-fhir/kiln"
)

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
	return db.inTx(ctx, func(tx pgx.Tx) error {
		if lim != (kiln.JobLimits{}) {
			// Kick-offs with limits, from every process, queue on one
			// transaction-scoped lock, so a count holds until its insert commits.
			if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('kiln.job-limits'))`); err != nil {
				return fmt.Errorf("postgres: job limits lock: %w", err)
			}
			var all, mine int
			if err := tx.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE owner=$1) FROM jobs WHERE state IN ($2, $3)`,
				j.Owner, string(kiln.JobAccepted), string(kiln.JobInProgress)).Scan(&all, &mine); err != nil {
				return fmt.Errorf("postgres: count unfinished jobs: %w", err)
			}
			if err := lim.Check(all, mine); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `INSERT INTO jobs(id, owner, state, created, updated, doc) VALUES($1, $2, $3, $4, $5, $6)`,
			j.ID, j.Owner, string(j.State), ms(j.Created), ms(j.Updated), doc); err != nil {
			return fmt.Errorf("postgres: insert job: %w", err)
		}
		rows := make([][]any, len(units))
		for i, u := range units {
			spec, err := json.Marshal(u)
			if err != nil {
				return fmt.Errorf("encode unit: %w", err)
			}
			rows[i] = []any{u.Job, u.Seq, unitPending, spec}
		}
		if _, err := tx.CopyFrom(ctx, pgx.Identifier{"units"}, []string{"job", "seq", "state", "spec"}, pgx.CopyFromRows(rows)); err != nil {
			return fmt.Errorf("postgres: insert units: %w", err)
		}
		if db.events != nil {
			return insertMessages(ctx, tx, db.events.JobChanged(nil, j))
		}
		return nil
	})
}

// SetPatients implements kiln.JobStore.
func (db *DB) SetPatients(ctx context.Context, job string, ids []string) error {
	return db.inTx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `DELETE FROM job_patients WHERE job=$1`, job); err != nil {
			return fmt.Errorf("postgres: clear patients: %w", err)
		}
		_, err := tx.CopyFrom(ctx, pgx.Identifier{"job_patients"}, []string{"job", "ord", "patient"},
			pgx.CopyFromSlice(len(ids), func(i int) ([]any, error) { return []any{job, i, ids[i]}, nil }))
		if err != nil {
			return fmt.Errorf("postgres: insert patients: %w", err)
		}
		return nil
	})
}

// GetJob implements kiln.JobStore.
func (db *DB) GetJob(ctx context.Context, id string) (*kiln.Job, error) {
	var j kiln.Job
	err := db.pool.QueryRow(ctx, `SELECT doc FROM jobs WHERE id=$1`, id).Scan(&j)
	if notFound(err) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "export job %s is not known", id)
	}
	if err != nil {
		return nil, fmt.Errorf("postgres: read job %s: %w", id, err)
	}
	return &j, nil
}

// UpdateJob implements kiln.JobStore. The row lock serializes changes to one job.
func (db *DB) UpdateJob(ctx context.Context, id string, fn func(*kiln.Job) error) (*kiln.Job, error) {
	var out *kiln.Job
	err := db.inTx(ctx, func(tx pgx.Tx) error {
		var j kiln.Job
		err := tx.QueryRow(ctx, `SELECT doc FROM jobs WHERE id=$1 FOR UPDATE`, id).Scan(&j)
		if notFound(err) {
			return kiln.Errorf(kiln.ENOTFOUND, "export job %s is not known", id)
		}
		if err != nil {
			return fmt.Errorf("postgres: read job %s: %w", id, err)
		}
		old := j
		if err := fn(&j); err != nil {
			return err
		}
		if db.events != nil && old.State != j.State {
			if err := insertMessages(ctx, tx, db.events.JobChanged(&old, &j)); err != nil {
				return err
			}
		}
		j.Updated = time.Now().UTC()
		doc, err := json.Marshal(&j)
		if err != nil {
			return fmt.Errorf("encode job: %w", err)
		}
		var expires int64
		if !j.Expires.IsZero() {
			expires = ms(j.Expires)
		}
		if _, err := tx.Exec(ctx, `UPDATE jobs SET state=$1, updated=$2, expires=$3, doc=$4 WHERE id=$5`,
			string(j.State), ms(j.Updated), expires, doc, id); err != nil {
			return fmt.Errorf("postgres: update job %s: %w", id, err)
		}
		out = &j
		return nil
	})
	return out, err
}

// DeleteJob implements kiln.JobStore.
func (db *DB) DeleteJob(ctx context.Context, id string) error {
	return db.inTx(ctx, func(tx pgx.Tx) error {
		for _, q := range []string{`DELETE FROM units WHERE job=$1`, `DELETE FROM job_patients WHERE job=$1`, `DELETE FROM jobs WHERE id=$1`} {
			if _, err := tx.Exec(ctx, q, id); err != nil {
				return fmt.Errorf("postgres: delete job %s: %w", id, err)
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
		s := make([]string, len(states))
		for i, st := range states {
			s[i] = string(st)
		}
		q += ` WHERE state = ANY($1::text[])`
		args = append(args, s)
	}
	rows, err := db.pool.Query(ctx, q+` ORDER BY created`, args...)
	if err != nil {
		return nil, fmt.Errorf("postgres: list jobs: %w", err)
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (*kiln.Job, error) {
		var j kiln.Job
		err := row.Scan(&j)
		return &j, err
	})
}

// ClaimUnit implements kiln.JobStore with SELECT … FOR UPDATE SKIP LOCKED, so
// workers in any number of processes each get a different unit.
func (db *DB) ClaimUnit(ctx context.Context, lease time.Duration) (*kiln.Unit, error) {
	var spec []byte
	var attempts int
	err := db.pool.QueryRow(ctx, `UPDATE units SET state=$1, attempts=attempts+1, lease=`+dbNow+`+$2
		WHERE (job, seq) = (SELECT u.job, u.seq FROM units u JOIN jobs j ON j.id=u.job
			WHERE u.state=$3 AND j.state = ANY($4::text[]) ORDER BY j.created, u.seq LIMIT 1 FOR UPDATE OF u SKIP LOCKED)
		RETURNING spec, attempts`, unitRunning, lease.Milliseconds(), unitPending,
		[]string{string(kiln.JobAccepted), string(kiln.JobInProgress)}).Scan(&spec, &attempts)
	if notFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("postgres: claim unit: %w", err)
	}
	var u kiln.Unit
	if err := json.Unmarshal(spec, &u); err != nil {
		return nil, fmt.Errorf("decode unit: %w", err)
	}
	u.Attempts = attempts
	return &u, nil
}

// FinishUnit implements kiln.JobStore.
func (db *DB) FinishUnit(ctx context.Context, u *kiln.Unit, parts []kiln.Part) (bool, error) {
	if parts == nil {
		parts = []kiln.Part{}
	}
	res, err := json.Marshal(parts)
	if err != nil {
		return false, fmt.Errorf("encode parts: %w", err)
	}
	// A unit of a job that failed or was cancelled meanwhile is not recorded: its files go.
	tag, err := db.pool.Exec(ctx, `UPDATE units SET state=$1, result=$2 WHERE job=$3 AND seq=$4 AND state=$5 AND attempts=$6
		AND EXISTS (SELECT 1 FROM jobs WHERE id=$3 AND state = ANY($7::text[]))`,
		unitDone, res, u.Job, u.Seq, unitRunning, u.Attempts, []string{string(kiln.JobAccepted), string(kiln.JobInProgress)})
	if err != nil {
		return false, fmt.Errorf("postgres: finish unit: %w", err)
	}
	return tag.RowsAffected() == 1, nil
}

// HeartbeatUnit implements kiln.JobStore.
func (db *DB) HeartbeatUnit(ctx context.Context, u *kiln.Unit, lease time.Duration) (kiln.Claim, error) {
	// Only a unit of a running job keeps its lease: that is how a cancel
	// in one process reaches units running in others.
	tag, err := db.pool.Exec(ctx, `UPDATE units SET lease=`+dbNow+`+$1 WHERE job=$2 AND seq=$3 AND state=$4 AND attempts=$5
		AND EXISTS (SELECT 1 FROM jobs j WHERE j.id=units.job AND j.state = ANY($6))`,
		lease.Milliseconds(), u.Job, u.Seq, unitRunning, u.Attempts, []string{string(kiln.JobAccepted), string(kiln.JobInProgress)})
	if err != nil {
		return 0, fmt.Errorf("postgres: heartbeat: %w", err)
	}
	if tag.RowsAffected() == 1 {
		return kiln.ClaimHeld, nil
	}
	// Not extended: tell a lost claim from a job that stopped running.
	var running bool
	if err := db.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM jobs WHERE id=$1 AND state = ANY($2))`,
		u.Job, []string{string(kiln.JobAccepted), string(kiln.JobInProgress)}).Scan(&running); err != nil {
		return 0, fmt.Errorf("postgres: heartbeat: %w", err)
	}
	if !running {
		return kiln.ClaimGone, nil
	}
	return kiln.ClaimLost, nil
}

// ReleaseUnit implements kiln.JobStore.
func (db *DB) ReleaseUnit(ctx context.Context, u *kiln.Unit) error {
	_, err := db.pool.Exec(ctx, `UPDATE units SET state=$1, lease=0 WHERE job=$2 AND seq=$3 AND state=$4 AND attempts=$5`,
		unitPending, u.Job, u.Seq, unitRunning, u.Attempts)
	if err != nil {
		return fmt.Errorf("postgres: release unit: %w", err)
	}
	return nil
}

// ReleaseExpired implements kiln.JobStore: units of workers that stopped heart-beating.
func (db *DB) ReleaseExpired(ctx context.Context) (int, error) {
	tag, err := db.pool.Exec(ctx, `UPDATE units SET state=$1, lease=0 WHERE state=$2 AND lease < `+dbNow, unitPending, unitRunning)
	if err != nil {
		return 0, fmt.Errorf("postgres: release expired units: %w", err)
	}
	return int(tag.RowsAffected()), nil
}

// UnitCounts implements kiln.JobStore.
func (db *DB) UnitCounts(ctx context.Context, job string) (total, done int, err error) {
	err = db.pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE state=$1) FROM units WHERE job=$2`, unitDone, job).Scan(&total, &done)
	if err != nil {
		err = fmt.Errorf("postgres: count units: %w", err)
	}
	return total, done, err
}

// Parts implements kiln.JobStore.
func (db *DB) Parts(ctx context.Context, job string) ([]kiln.Part, error) {
	rows, err := db.pool.Query(ctx, `SELECT result FROM units WHERE job=$1 AND state=$2 ORDER BY seq`, job, unitDone)
	if err != nil {
		return nil, fmt.Errorf("postgres: list parts: %w", err)
	}
	defer rows.Close()
	var out []kiln.Part
	for rows.Next() {
		var parts []kiln.Part
		if err := rows.Scan(&parts); err != nil {
			return nil, fmt.Errorf("postgres: decode parts: %w", err)
		}
		out = append(out, parts...)
	}
	return out, rows.Err()
}

// Running implements kiln.JobStore.
func (db *DB) Running(ctx context.Context, owner string) (all, mine int, err error) {
	err = db.pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE owner=$1) FROM jobs WHERE state = ANY($2::text[])`,
		owner, []string{string(kiln.JobAccepted), string(kiln.JobInProgress)}).Scan(&all, &mine)
	if err != nil {
		err = fmt.Errorf("postgres: count running jobs: %w", err)
	}
	return all, mine, err
}

var _ kiln.JobStore = (*DB)(nil)
