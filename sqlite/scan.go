package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/kiln-fhir/kiln"
)

// maxIn caps the bound parameters of one IN list.
const maxIn = 5000

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

func accessCond(codes []string, col string) (string, []any) {
	if codes == nil {
		return "", nil
	}
	if len(codes) == 0 {
		return " AND 0", nil
	}
	args := make([]any, len(codes))
	for i, c := range codes {
		args[i] = c
	}
	return " AND EXISTS (SELECT 1 FROM access a WHERE a.rid=" + col + " AND a.code IN (" + placeholders(len(codes)) + "))", args
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
	batch := min(q.Batch, maxIn)
	for start := 0; start < len(rids); start += batch {
		chunk := rids[start:min(start+batch, len(rids))]
		if err := db.emitRows(ctx, chunk, w, q.AccessCodes, fn); err != nil {
			return err
		}
	}
	return nil
}

// scanRange reads one type's (lu, rid) keyset range page by page, then, in the
// range that runs to the end, the versions current at the snapshot of
// resources changed after it.
func (db *DB) scanRange(ctx context.Context, q kiln.ScanQuery, fn func([]byte) error) error {
	w := windowOf(q)
	acc, accArgs := accessCond(q.AccessCodes, "r.rid")
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
	query := `SELECT r.rid, r.lu, r.body FROM resources r INDEXED BY resources_type_lu
		WHERE r.type=? AND (r.lu, r.rid) > (?, ?) AND (r.lu, r.rid) <= (?, ?) AND r.deleted=0` + acc + `
		ORDER BY r.lu, r.rid LIMIT ?`
	for {
		args := append([]any{q.Type, cur.LastUpdated, cur.Row, hi.LastUpdated, hi.Row}, accArgs...)
		args = append(args, q.Batch)
		n, last, err := db.page(ctx, query, args, fn)
		if err != nil {
			return fmt.Errorf("scan %s: %w", q.Type, err)
		}
		if n < q.Batch {
			break
		}
		cur = last
	}
	if q.To != (kiln.Cursor{}) {
		return nil
	}
	// Resources changed since the snapshot: their version as of the snapshot,
	// judged by that version's own tags (the access index follows the current one).
	rows, err := db.read.QueryContext(ctx, `SELECT h.body FROM resources r JOIN history h ON h.type=r.type AND h.id=r.id
		WHERE r.type=? AND r.lu > ? AND h.deleted=0 AND h.lu > ? AND h.lu <= ?
		AND h.version=(SELECT max(h2.version) FROM history h2 WHERE h2.type=r.type AND h2.id=r.id AND h2.lu <= ?)`,
		q.Type, w.snap, w.since, w.until, w.snap)
	if err != nil {
		return fmt.Errorf("scan %s changed since snapshot: %w", q.Type, err)
	}
	return eachBody(rows, kiln.TaggedOnly(q.AccessCodes, fn))
}

func (db *DB) page(ctx context.Context, query string, args []any, fn func([]byte) error) (int, kiln.Cursor, error) {
	rows, err := db.read.QueryContext(ctx, query, args...)
	if err != nil {
		return 0, kiln.Cursor{}, err
	}
	defer rows.Close()
	n := 0
	var last kiln.Cursor
	for rows.Next() {
		var body sql.RawBytes
		if err := rows.Scan(&last.Row, &last.LastUpdated, &body); err != nil {
			return n, last, err
		}
		if err := fn(body); err != nil {
			return n, last, err
		}
		n++
	}
	return n, last, rows.Err()
}

func eachBody(rows *sql.Rows, fn func([]byte) error) error {
	defer rows.Close()
	for rows.Next() {
		var body sql.RawBytes
		if err := rows.Scan(&body); err != nil {
			return err
		}
		if err := fn(body); err != nil {
			return err
		}
	}
	return rows.Err()
}

// unitRows lists the row ids a patient-batch or supporting unit reads, in order.
func (db *DB) unitRows(ctx context.Context, q kiln.ScanQuery) ([]int64, error) {
	var rows *sql.Rows
	var err error
	if q.Supporting {
		rows, err = db.read.QueryContext(ctx, `SELECT DISTINCT r.rid FROM job_patients jp
			JOIN supporting s ON s.patient=jp.patient AND s.type=?
			JOIN resources r ON r.type=s.type AND r.id=s.id
			WHERE jp.job=? ORDER BY r.rid`, q.Type, q.Job)
	} else {
		// The compartment as of the snapshot: current memberships that began
		// by then, and ended ones that were still on. The NOT EXISTS keeps a
		// resource for the batch of its lowest-ordinal patient of then; the
		// index hints keep that check to a few seeks per row.
		rows, err = db.read.QueryContext(ctx, `SELECT DISTINCT m.rid FROM (
				SELECT c.rid FROM job_patients jp JOIN compartment c ON c.patient=jp.patient AND c.type=?1
				WHERE jp.job=?2 AND jp.ord BETWEEN ?3 AND ?4 AND c.since <= ?5
				UNION ALL
				SELECT g.rid FROM job_patients jp JOIN compartment_gone g ON g.patient=jp.patient AND g.type=?1
				WHERE jp.job=?2 AND jp.ord BETWEEN ?3 AND ?4 AND g.since <= ?5 AND g.until > ?5) m
			WHERE NOT EXISTS (SELECT 1 FROM compartment c2 INDEXED BY compartment_rid_since CROSS
				JOIN job_patients jp2 INDEXED BY job_patients_patient ON jp2.job=?2 AND jp2.patient=c2.patient
				WHERE c2.rid=m.rid AND c2.since <= ?5 AND jp2.ord < ?3)
			AND NOT EXISTS (SELECT 1 FROM compartment_gone g2 INDEXED BY compartment_gone_rid CROSS
				JOIN job_patients jp2 INDEXED BY job_patients_patient ON jp2.job=?2 AND jp2.patient=g2.patient
				WHERE g2.rid=m.rid AND g2.since <= ?5 AND g2.until > ?5 AND jp2.ord < ?3)
			ORDER BY m.rid`, q.Type, q.Job, q.PatientLo, q.PatientHi, ms(q.Snapshot))
	}
	if err != nil {
		return nil, fmt.Errorf("list %s rows of job %s: %w", q.Type, q.Job, err)
	}
	return column[int64](rows)
}

// column reads the one column of every row, and closes rows.
func column[T any](rows *sql.Rows) ([]T, error) {
	defer rows.Close()
	var out []T
	for rows.Next() {
		var v T
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// emitRows writes the listed rows as of the snapshot.
func (db *DB) emitRows(ctx context.Context, rids []int64, w window, codes []string, fn func([]byte) error) error {
	args := make([]any, len(rids))
	for i, r := range rids {
		args[i] = r
	}
	// The access index judges rows unchanged since the snapshot; a row
	// changed after it is read below as of the snapshot, by that version's tags.
	acc, accArgs := accessCond(codes, "r.rid")
	if acc != "" {
		acc = " AND (r.lu > ? OR " + strings.TrimPrefix(acc, " AND ") + ")"
		accArgs = append([]any{w.snap}, accArgs...)
	}
	rows, err := db.read.QueryContext(ctx, `SELECT r.type, r.id, r.lu, r.deleted, r.body FROM resources r
		WHERE r.rid IN (`+placeholders(len(rids))+`)`+acc+` ORDER BY r.rid`, append(args, accArgs...)...)
	if err != nil {
		return fmt.Errorf("read rows: %w", err)
	}
	var changed []kiln.Ref
	err = func() error {
		defer rows.Close()
		for rows.Next() {
			var typ, id string
			var lu int64
			var deleted bool
			var body sql.RawBytes
			if err := rows.Scan(&typ, &id, &lu, &deleted, &body); err != nil {
				return err
			}
			if lu > w.snap {
				changed = append(changed, kiln.Ref{Type: typ, ID: id})
				continue
			}
			if deleted || lu <= w.since || lu > w.until {
				continue
			}
			if err := fn(body); err != nil {
				return err
			}
		}
		return rows.Err()
	}()
	if err != nil || len(changed) == 0 {
		return err
	}
	for _, ref := range changed {
		rows, err := db.read.QueryContext(ctx, `SELECT h.body FROM history h WHERE h.type=? AND h.id=?
			AND h.deleted=0 AND h.lu > ? AND h.lu <= ?
			AND h.version=(SELECT max(h2.version) FROM history h2 WHERE h2.type=h.type AND h2.id=h.id AND h2.lu <= ?)`,
			ref.Type, ref.ID, w.since, w.until, w.snap)
		if err != nil {
			return fmt.Errorf("read %s/%s as of snapshot: %w", ref.Type, ref.ID, err)
		}
		if err := eachBody(rows, kiln.TaggedOnly(codes, fn)); err != nil {
			return err
		}
	}
	return nil
}

// SplitType implements kiln.ExportReader. It walks the (type, lu) index once;
// this is planning, not pagination, and reads no resource bodies.
func (db *DB) SplitType(ctx context.Context, typ string, snapshot time.Time, size int) ([]kiln.Cursor, error) {
	rows, err := db.read.QueryContext(ctx, `SELECT lu, rid FROM resources INDEXED BY resources_type_lu WHERE type=? AND lu <= ? ORDER BY lu, rid`, typ, ms(snapshot))
	if err != nil {
		return nil, fmt.Errorf("split %s: %w", typ, err)
	}
	defer rows.Close()
	var out []kiln.Cursor
	n := 0
	for rows.Next() {
		n++
		if n%size != 0 {
			continue
		}
		var c kiln.Cursor
		if err := rows.Scan(&c.LastUpdated, &c.Row); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("split %s: %w", typ, err)
	}
	// A last boundary that leaves an empty tail is dropped.
	if n > 0 && n%size == 0 && len(out) > 0 {
		out = out[:len(out)-1]
	}
	return out, nil
}

// Deletions implements kiln.ExportReader.
func (db *DB) Deletions(ctx context.Context, types []string, since, until time.Time, job string, codes []string, fn func(kiln.Deleted) error) error {
	if len(types) == 0 {
		return nil
	}
	targs := make([]any, len(types))
	for i, t := range types {
		targs[i] = t
	}
	var rows *sql.Rows
	var err error
	// Tombstones keep their access rows, so deletions are filtered like data.
	acc, accArgs := accessCond(codes, "r.rid")
	if job == "" {
		rows, err = db.read.QueryContext(ctx, `SELECT r.type, r.id, r.lu FROM resources r WHERE r.deleted=1 AND r.lu > ? AND r.lu <= ?
			AND r.type IN (`+placeholders(len(types))+`)`+acc+` ORDER BY r.type, r.lu, r.rid`, append(append([]any{ms(since), ms(until)}, targs...), accArgs...)...)
	} else {
		rows, err = db.read.QueryContext(ctx, `SELECT DISTINCT r.type, r.id, r.lu FROM job_patients jp
			JOIN compartment c ON c.patient=jp.patient JOIN resources r ON r.rid=c.rid
			WHERE jp.job=? AND r.deleted=1 AND r.lu > ? AND r.lu <= ? AND r.type IN (`+placeholders(len(types))+`)`+acc+`
			ORDER BY r.type, r.lu`, append(append([]any{job, ms(since), ms(until)}, targs...), accArgs...)...)
	}
	if err != nil {
		return fmt.Errorf("list deletions: %w", err)
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
	snap := ms(snapshot)
	query := `SELECT id FROM resources WHERE type='Patient' AND deleted=0 AND lu <= ?1 %s
		UNION SELECT r.id FROM resources r JOIN history h ON h.type=r.type AND h.id=r.id
		WHERE r.type='Patient' AND r.lu > ?1 AND h.deleted=0 %s
		AND h.version=(SELECT max(h2.version) FROM history h2 WHERE h2.type=h.type AND h2.id=h.id AND h2.lu <= ?1)
		ORDER BY 1`
	run := func(cond string, args []any) ([]string, error) {
		rows, err := db.read.QueryContext(ctx, fmt.Sprintf(query, strings.ReplaceAll(cond, "@", ""), strings.ReplaceAll(cond, "@", "r.")), append([]any{snap}, args...)...)
		if err != nil {
			return nil, fmt.Errorf("list patients: %w", err)
		}
		return column[string](rows)
	}
	if ids == nil {
		return run("", nil)
	}
	var out []string
	for start := 0; start < len(ids); start += maxIn {
		chunk := ids[start:min(start+maxIn, len(ids))]
		args := make([]any, len(chunk))
		for i, id := range chunk {
			args[i] = id
		}
		// Parameters are numbered after ?1.
		ph := make([]string, len(chunk))
		for i := range chunk {
			ph[i] = fmt.Sprintf("?%d", i+2)
		}
		got, err := run("AND @id IN ("+strings.Join(ph, ",")+")", args)
		if err != nil {
			return nil, err
		}
		out = append(out, got...)
	}
	return out, nil
}

// TypesPresent implements kiln.ExportReader.
func (db *DB) TypesPresent(ctx context.Context) ([]string, error) {
	rows, err := db.read.QueryContext(ctx, `SELECT DISTINCT type FROM resources ORDER BY type`)
	if err != nil {
		return nil, fmt.Errorf("list types: %w", err)
	}
	return column[string](rows)
}

var _ kiln.ExportReader = (*DB)(nil)

// JobPatients implements kiln.ExportReader.
func (db *DB) JobPatients(ctx context.Context, job string, lo, hi int) ([]string, error) {
	rows, err := db.read.QueryContext(ctx, `SELECT patient FROM job_patients WHERE job=? AND ord BETWEEN ? AND ? ORDER BY ord`, job, lo, hi)
	if err != nil {
		return nil, fmt.Errorf("list patients of job %s: %w", job, err)
	}
	return column[string](rows)
}
