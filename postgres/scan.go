package postgres

import (
	"context"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kiln-fhir/kiln"
)

type window struct{ since, until, snap int64 }

func windowOf(q kiln.ScanQuery) window {
	w := window{since: math.MinInt64, snap: ms(q.Snapshot)}
	w.until = w.snap
	if !q.Since.IsZero() {
		w.since = ms(q.Since)
	}
	if !q.Until.IsZero() && ms(q.Until) < w.until {
		w.until = ms(q.Until)
	}
	return w
}

// accessCond filters on access codes; codes == nil means no filter.
func accessCond(codes []string, col string, args *[]any) string {
	if codes == nil {
		return ""
	}
	*args = append(*args, codes)
	return fmt.Sprintf(" AND EXISTS (SELECT 1 FROM access a WHERE a.rid=%s AND a.code = ANY($%d::text[]))", col, len(*args))
}

// eachRaw calls fn with the first column's raw bytes (bytea comes in binary:
// the stored bytes, not copied).
func eachRaw(rows pgx.Rows, fn func([]byte) error) error {
	defer rows.Close()
	for rows.Next() {
		if err := fn(rows.RawValues()[0]); err != nil {
			return err
		}
	}
	return rows.Err()
}

// Scan implements kiln.ExportReader.
func (db *DB) Scan(ctx context.Context, q kiln.ScanQuery, fn func([]byte) error) error {
	if q.Batch <= 0 {
		q.Batch = 1000
	}
	if q.Job == "" {
		return db.scanRange(ctx, q, fn)
	}
	rids, err := db.unitRows(ctx, q)
	if err != nil {
		return err
	}
	w := windowOf(q)
	for start := 0; start < len(rids); start += q.Batch {
		if err := db.emitRows(ctx, rids[start:min(start+q.Batch, len(rids))], w, q.AccessCodes, fn); err != nil {
			return err
		}
	}
	return nil
}

func (db *DB) scanRange(ctx context.Context, q kiln.ScanQuery, fn func([]byte) error) error {
	w := windowOf(q)
	cur := q.From
	// A range may start inside the millisecond _since names: _since is
	// exclusive, so the scan starts after all of it.
	if cur.LastUpdated <= w.since {
		cur = kiln.Cursor{LastUpdated: w.since, Row: math.MaxInt64}
	}
	hi := kiln.Cursor{LastUpdated: w.until, Row: math.MaxInt64}
	if q.To != (kiln.Cursor{}) && (q.To.LastUpdated < hi.LastUpdated || (q.To.LastUpdated == hi.LastUpdated && q.To.Row < hi.Row)) {
		hi = q.To
	}
	for {
		args := []any{q.Type, cur.LastUpdated, cur.Row, hi.LastUpdated, hi.Row}
		acc := accessCond(q.AccessCodes, "r.rid", &args)
		args = append(args, q.Batch)
		rows, err := db.pool.Query(ctx, `SELECT r.body, r.lu, r.rid FROM resources r
			WHERE r.type=$1 AND (r.lu, r.rid) > ($2, $3) AND (r.lu, r.rid) <= ($4, $5) AND NOT r.deleted`+acc+`
			ORDER BY r.lu, r.rid LIMIT $`+fmt.Sprint(len(args)), args...)
		if err != nil {
			return fmt.Errorf("postgres: scan %s: %w", q.Type, err)
		}
		n := 0
		for rows.Next() {
			raw := rows.RawValues()
			if err := fn(raw[0]); err != nil {
				rows.Close()
				return err
			}
			if err := rows.Scan(nil, &cur.LastUpdated, &cur.Row); err != nil {
				rows.Close()
				return err
			}
			n++
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("postgres: scan %s: %w", q.Type, err)
		}
		if n < q.Batch {
			break
		}
	}
	if q.To != (kiln.Cursor{}) {
		return nil
	}
	// Judged by the tags of the version as of the snapshot: the access index
	// follows the current version.
	rows, err := db.pool.Query(ctx, `SELECT h.body FROM resources r JOIN history h ON h.type=r.type AND h.id=r.id
		WHERE r.type=$1 AND r.lu > $2 AND NOT h.deleted AND h.lu > $3 AND h.lu <= $4
		AND h.version=(SELECT max(h2.version) FROM history h2 WHERE h2.type=r.type AND h2.id=r.id AND h2.lu <= $2)`,
		q.Type, w.snap, w.since, w.until)
	if err != nil {
		return fmt.Errorf("postgres: scan %s changed since snapshot: %w", q.Type, err)
	}
	return eachRaw(rows, kiln.TaggedOnly(q.AccessCodes, fn))
}

func (db *DB) unitRows(ctx context.Context, q kiln.ScanQuery) ([]int64, error) {
	var rows pgx.Rows
	var err error
	if q.Supporting {
		rows, err = db.pool.Query(ctx, `SELECT DISTINCT r.rid FROM job_patients jp
			JOIN supporting s ON s.patient=jp.patient AND s.type=$1
			JOIN resources r ON r.type=s.type AND r.id=s.id
			WHERE jp.job=$2 ORDER BY r.rid`, q.Type, q.Job)
	} else {
		// The compartment as of the snapshot: current memberships that began
		// by then, and ended ones still on then. A resource goes to the batch
		// of its lowest-ordinal patient of then, so it is written once.
		rows, err = db.pool.Query(ctx, `SELECT DISTINCT m.rid FROM (
				SELECT c.rid FROM job_patients jp JOIN compartment c ON c.patient=jp.patient AND c.type=$1
				WHERE jp.job=$2 AND jp.ord BETWEEN $3 AND $4 AND c.since <= $5
				UNION ALL
				SELECT g.rid FROM job_patients jp JOIN compartment_gone g ON g.patient=jp.patient AND g.type=$1
				WHERE jp.job=$2 AND jp.ord BETWEEN $3 AND $4 AND g.since <= $5 AND g.until > $5) m
			WHERE NOT EXISTS (SELECT 1 FROM compartment c2 JOIN job_patients jp2 ON jp2.job=$2 AND jp2.patient=c2.patient
				WHERE c2.rid=m.rid AND c2.since <= $5 AND jp2.ord < $3)
			AND NOT EXISTS (SELECT 1 FROM compartment_gone g2 JOIN job_patients jp2 ON jp2.job=$2 AND jp2.patient=g2.patient
				WHERE g2.rid=m.rid AND g2.since <= $5 AND g2.until > $5 AND jp2.ord < $3)
			ORDER BY m.rid`, q.Type, q.Job, q.PatientLo, q.PatientHi, ms(q.Snapshot))
	}
	if err != nil {
		return nil, fmt.Errorf("postgres: list %s rows of job %s: %w", q.Type, q.Job, err)
	}
	return pgx.CollectRows(rows, pgx.RowTo[int64])
}

func (db *DB) emitRows(ctx context.Context, rids []int64, w window, codes []string, fn func([]byte) error) error {
	// The access index judges rows unchanged since the snapshot; a row
	// changed after it is read below as of the snapshot, by that version's tags.
	args := []any{rids}
	acc := ""
	if codes != nil {
		args = append(args, w.snap)
		acc = " AND (r.lu > $2 OR " + strings.TrimPrefix(accessCond(codes, "r.rid", &args), " AND ") + ")"
	}
	rows, err := db.pool.Query(ctx, `SELECT r.body, r.type, r.id, r.lu, r.deleted FROM resources r
		WHERE r.rid = ANY($1::bigint[])`+acc+` ORDER BY r.rid`, args...)
	if err != nil {
		return fmt.Errorf("postgres: read rows: %w", err)
	}
	var changedT, changedID []string
	err = func() error {
		defer rows.Close()
		for rows.Next() {
			var typ, id string
			var lu int64
			var deleted bool
			if err := rows.Scan(nil, &typ, &id, &lu, &deleted); err != nil {
				return err
			}
			if lu > w.snap {
				changedT, changedID = append(changedT, typ), append(changedID, id)
				continue
			}
			if deleted || lu <= w.since || lu > w.until {
				continue
			}
			if err := fn(rows.RawValues()[0]); err != nil {
				return err
			}
		}
		return rows.Err()
	}()
	if err != nil || len(changedT) == 0 {
		return err
	}
	rows, err = db.pool.Query(ctx, `SELECT h.body FROM history h JOIN unnest($1::text[], $2::text[]) AS k(type, id) ON h.type=k.type AND h.id=k.id
		WHERE NOT h.deleted AND h.lu > $3 AND h.lu <= $4
		AND h.version=(SELECT max(h2.version) FROM history h2 WHERE h2.type=h.type AND h2.id=h.id AND h2.lu <= $5)`,
		changedT, changedID, w.since, w.until, w.snap)
	if err != nil {
		return fmt.Errorf("postgres: read as of snapshot: %w", err)
	}
	return eachRaw(rows, kiln.TaggedOnly(codes, fn))
}

// SplitType implements kiln.ExportReader.
func (db *DB) SplitType(ctx context.Context, typ string, snapshot time.Time, size int) ([]kiln.Cursor, error) {
	// Every size-th row of the (type, lu, rid) index, numbered in one pass.
	rows, err := db.pool.Query(ctx, `SELECT lu, rid FROM (
		SELECT lu, rid, row_number() OVER (ORDER BY lu, rid) AS n FROM resources WHERE type=$1 AND lu <= $2) t
		WHERE n % $3 = 0 ORDER BY n`, typ, ms(snapshot), size)
	if err != nil {
		return nil, fmt.Errorf("postgres: split %s: %w", typ, err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (kiln.Cursor, error) {
		var c kiln.Cursor
		err := row.Scan(&c.LastUpdated, &c.Row)
		return c, err
	})
	if err != nil {
		return nil, fmt.Errorf("postgres: split %s: %w", typ, err)
	}
	var total int
	if err := db.pool.QueryRow(ctx, `SELECT count(*) FROM resources WHERE type=$1 AND lu <= $2`, typ, ms(snapshot)).Scan(&total); err != nil {
		return nil, fmt.Errorf("postgres: split %s: %w", typ, err)
	}
	if total > 0 && total%size == 0 && len(out) > 0 {
		out = out[:len(out)-1]
	}
	return out, nil
}

// Deletions implements kiln.ExportReader.
func (db *DB) Deletions(ctx context.Context, types []string, since, until time.Time, job string, codes []string, fn func(kiln.Deleted) error) error {
	if len(types) == 0 {
		return nil
	}
	var rows pgx.Rows
	var err error
	if job == "" {
		args := []any{ms(since), ms(until), types}
		acc := accessCond(codes, "r.rid", &args)
		rows, err = db.pool.Query(ctx, `SELECT r.type, r.id, r.lu FROM resources r WHERE r.deleted AND r.lu > $1 AND r.lu <= $2
			AND r.type = ANY($3::text[])`+acc+` ORDER BY r.type, r.lu, r.rid`, args...)
	} else {
		args := []any{job, ms(since), ms(until), types}
		acc := accessCond(codes, "r.rid", &args)
		rows, err = db.pool.Query(ctx, `SELECT DISTINCT r.type, r.id, r.lu FROM job_patients jp
			JOIN compartment c ON c.patient=jp.patient JOIN resources r ON r.rid=c.rid
			WHERE jp.job=$1 AND r.deleted AND r.lu > $2 AND r.lu <= $3 AND r.type = ANY($4::text[])`+acc+`
			ORDER BY r.type, r.lu`, args...)
	}
	if err != nil {
		return fmt.Errorf("postgres: list deletions: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var d kiln.Deleted
		var lu int64
		if err := rows.Scan(&d.Type, &d.ID, &lu); err != nil {
			return err
		}
		d.LastUpdated = fromMS(lu)
		if err := fn(d); err != nil {
			return err
		}
	}
	return rows.Err()
}

// PatientsAt implements kiln.ExportReader.
func (db *DB) PatientsAt(ctx context.Context, snapshot time.Time, ids []string) ([]string, error) {
	cond := ""
	args := []any{ms(snapshot)}
	if ids != nil {
		cond = " AND r.id = ANY($2::text[])"
		args = append(args, ids)
	}
	rows, err := db.pool.Query(ctx, `SELECT r.id FROM resources r WHERE r.type='Patient' AND NOT r.deleted AND r.lu <= $1`+cond+`
		UNION SELECT r.id FROM resources r JOIN history h ON h.type=r.type AND h.id=r.id
		WHERE r.type='Patient' AND r.lu > $1 AND NOT h.deleted`+cond+`
		AND h.version=(SELECT max(h2.version) FROM history h2 WHERE h2.type=h.type AND h2.id=h.id AND h2.lu <= $1)
		ORDER BY 1`, args...)
	if err != nil {
		return nil, fmt.Errorf("postgres: list patients: %w", err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("postgres: list patients: %w", err)
	}
	return out, nil
}

// TypesPresent implements kiln.ExportReader.
func (db *DB) TypesPresent(ctx context.Context) ([]string, error) {
	// A loose index scan: one probe per type instead of reading every row.
	rows, err := db.pool.Query(ctx, `WITH RECURSIVE t(type) AS (
		SELECT min(type) FROM resources
		UNION ALL SELECT (SELECT min(type) FROM resources WHERE type > t.type) FROM t WHERE t.type IS NOT NULL)
		SELECT type FROM t WHERE type IS NOT NULL`)
	if err != nil {
		return nil, fmt.Errorf("postgres: list types: %w", err)
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// JobPatients implements kiln.ExportReader.
func (db *DB) JobPatients(ctx context.Context, job string, lo, hi int) ([]string, error) {
	rows, err := db.pool.Query(ctx, `SELECT patient FROM job_patients WHERE job=$1 AND ord BETWEEN $2 AND $3 ORDER BY ord`, job, lo, hi)
	if err != nil {
		return nil, fmt.Errorf("postgres: list patients of job %s: %w", job, err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("postgres: list patients of job %s: %w", job, err)
	}
	return ids, nil
}

var _ kiln.ExportReader = (*DB)(nil)
