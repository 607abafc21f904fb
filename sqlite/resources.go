package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// Write implements kiln.ResourceStore: one transaction for the whole batch.
// New resources, and all index rows, are written with multi-row INSERTs and
// existing ones are looked up one query per type: a bulk load costs a few
// statements per batch, not several per resource.
func (db *DB) Write(ctx context.Context, ws []kiln.Write) ([]kiln.WriteResult, error) {
	db.mu.Lock()
	defer db.mu.Unlock()
	lu := db.tick()
	tx, err := db.write.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("begin write: %w", err)
	}
	defer tx.Rollback()
	w := writer{tx: tx, lu: lu, luText: fhir.FormatInstant(fromMS(lu)), nextRID: db.nextRID}
	if w.nextRID == 0 {
		if err := tx.QueryRowContext(ctx, `SELECT coalesce(max(rid), 0) + 1 FROM resources`).Scan(&w.nextRID); err != nil {
			return nil, fmt.Errorf("read row ids: %w", err)
		}
	}
	if err := w.prepare(ctx); err != nil {
		return nil, err
	}
	defer w.close()
	if err := w.lookup(ctx, ws); err != nil {
		return nil, err
	}
	out := make([]kiln.WriteResult, len(ws))
	for i := range ws {
		res, err := w.apply(ctx, &ws[i])
		if err != nil {
			return nil, err
		}
		out[i] = res
	}
	if err := w.flush(ctx); err != nil {
		return nil, err
	}
	if db.events != nil {
		var changed []kiln.WriteResult
		for _, r := range out {
			if !r.Unchanged {
				changed = append(changed, r)
			}
		}
		if len(changed) > 0 {
			if err := insertMessages(ctx, tx, db.events.ResourcesWritten(changed)); err != nil {
				return nil, err
			}
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("commit write: %w", err)
	}
	db.floor = lu
	db.nextRID = w.nextRID
	return out, nil
}

type current struct {
	rid, version int64
	deleted      bool
	hash         []byte
	// pending marks a row inserted or reindexed by this batch but not flushed yet.
	pending bool
}

type writer struct {
	tx      *sql.Tx
	lu      int64
	luText  string
	nextRID int64
	stmts   map[string]*sql.Stmt
	cur     map[kiln.Ref]*current
	// Rows waiting for a multi-row INSERT.
	resRows, compRows, suppRows, accRows []any
}

var writeSQL = map[string]string{
	"update":    `UPDATE resources SET version=?, lu=?, deleted=?, hash=?, body=? WHERE rid=?`,
	"archive":   `INSERT INTO history(type, id, version, lu, deleted, body) SELECT type, id, version, lu, deleted, body FROM resources WHERE rid=?`,
	"compOf":    `SELECT patient FROM compartment WHERE rid=?`,
	"endComp":   `INSERT OR IGNORE INTO compartment_gone(patient, type, rid, since, until) SELECT patient, type, rid, since, ? FROM compartment WHERE rid=? AND patient=?`,
	"dropComp":  `DELETE FROM compartment WHERE rid=? AND patient=?`,
	"delAccess": `DELETE FROM access WHERE rid=?`,
}

// Multi-row INSERTs: table, columns, and the prefix of the statement.
var bulkSQL = []struct {
	name string
	cols int
	head string
}{
	{"res", 8, `INSERT INTO resources(rid, type, id, version, lu, deleted, hash, body) VALUES`},
	{"comp", 4, `INSERT OR IGNORE INTO compartment(patient, type, rid, since) VALUES`},
	{"supp", 3, `INSERT OR IGNORE INTO supporting(patient, type, id) VALUES`},
	{"access", 2, `INSERT OR IGNORE INTO access(code, rid) VALUES`},
}

// bulkRows is the number of rows per multi-row INSERT.
const bulkRows = 100

func (w *writer) prepare(ctx context.Context) error {
	w.stmts = make(map[string]*sql.Stmt, len(writeSQL))
	for k, q := range writeSQL {
		s, err := w.tx.PrepareContext(ctx, q)
		if err != nil {
			return fmt.Errorf("prepare %s: %w", k, err)
		}
		w.stmts[k] = s
	}
	return nil
}

func (w *writer) close() {
	for _, s := range w.stmts {
		s.Close()
	}
}

// lookup reads the current state of every resource the batch touches.
func (w *writer) lookup(ctx context.Context, ws []kiln.Write) error {
	w.cur = make(map[kiln.Ref]*current, len(ws))
	byType := map[string][]any{}
	for _, wr := range ws {
		byType[wr.Type] = append(byType[wr.Type], wr.ID)
	}
	for typ, ids := range byType {
		for start := 0; start < len(ids); start += maxIn {
			chunk := ids[start:min(start+maxIn, len(ids))]
			rows, err := w.tx.QueryContext(ctx, `SELECT id, rid, version, deleted, hash FROM resources WHERE type=? AND id IN (`+placeholders(len(chunk))+`)`,
				append([]any{typ}, chunk...)...)
			if err != nil {
				return fmt.Errorf("look up %s: %w", typ, err)
			}
			for rows.Next() {
				var id string
				c := &current{}
				if err := rows.Scan(&id, &c.rid, &c.version, &c.deleted, &c.hash); err != nil {
					rows.Close()
					return fmt.Errorf("look up %s: %w", typ, err)
				}
				w.cur[kiln.Ref{Type: typ, ID: id}] = c
			}
			rows.Close()
			if err := rows.Err(); err != nil {
				return fmt.Errorf("look up %s: %w", typ, err)
			}
		}
	}
	return nil
}

func (w *writer) apply(ctx context.Context, wr *kiln.Write) (kiln.WriteResult, error) {
	key := kiln.Ref{Type: wr.Type, ID: wr.ID}
	c := w.cur[key]
	exists := c != nil
	if exists && c.pending {
		// The same resource twice in one batch: the first must be in the table first.
		if err := w.flush(ctx); err != nil {
			return kiln.WriteResult{}, err
		}
	}
	var cv current
	if exists {
		cv = *c
	}
	step, res, err := kiln.Decide(wr, kiln.Prior{Exists: exists, Deleted: cv.deleted, Version: cv.version, Hash: cv.hash})
	if err != nil || step == kiln.StepNone {
		return res, err
	}
	if step == kiln.StepDelete {
		if _, err := w.stmts["archive"].ExecContext(ctx, cv.rid); err != nil {
			return res, fmt.Errorf("archive %s/%s: %w", wr.Type, wr.ID, err)
		}
		if _, err := w.stmts["update"].ExecContext(ctx, res.Version, w.lu, true, nil, nil, cv.rid); err != nil {
			return res, fmt.Errorf("delete %s/%s: %w", wr.Type, wr.ID, err)
		}
		w.cur[key] = &current{rid: cv.rid, version: res.Version, deleted: true}
		res.LastUpdated = fromMS(w.lu)
		return res, nil
	}
	version := res.Version
	body := fhir.SpliceMeta(wr.Body, wr.MetaAt, wr.MetaEmpty, strconv.FormatInt(version, 10), w.luText)
	rid := cv.rid
	if step == kiln.StepUpdate {
		if _, err := w.stmts["archive"].ExecContext(ctx, rid); err != nil {
			return res, fmt.Errorf("archive %s/%s: %w", wr.Type, wr.ID, err)
		}
		if _, err := w.stmts["update"].ExecContext(ctx, version, w.lu, false, wr.Hash, body, rid); err != nil {
			return res, fmt.Errorf("update %s/%s: %w", wr.Type, wr.ID, err)
		}
		if _, err := w.stmts["delAccess"].ExecContext(ctx, rid); err != nil {
			return res, fmt.Errorf("reindex %s/%s: %w", wr.Type, wr.ID, err)
		}
		if err := w.moveCompartment(ctx, rid, wr.Patients); err != nil {
			return res, fmt.Errorf("reindex %s/%s: %w", wr.Type, wr.ID, err)
		}
		// pending: a second write of it in this batch must see the new rows.
		w.cur[key] = &current{rid: rid, version: version, hash: wr.Hash, pending: true}
	} else {
		rid = w.nextRID
		w.nextRID++
		w.resRows = append(w.resRows, rid, wr.Type, wr.ID, version, w.lu, false, wr.Hash, body)
		w.cur[key] = &current{rid: rid, version: version, hash: wr.Hash, pending: true}
	}
	for _, p := range wr.Patients {
		// A membership the row already has keeps its since (OR IGNORE).
		w.compRows = append(w.compRows, p, wr.Type, rid, w.lu)
		for _, s := range wr.Supporting {
			w.suppRows = append(w.suppRows, p, s.Type, s.ID)
		}
	}
	for _, p := range wr.PatientRefs {
		w.suppRows = append(w.suppRows, p, wr.Type, wr.ID)
	}
	for _, code := range wr.AccessCodes {
		w.accRows = append(w.accRows, code, rid)
	}
	res.Version, res.LastUpdated, res.Body = version, fromMS(w.lu), body
	if len(w.resRows) >= bulkRows*8 {
		if err := w.flush(ctx); err != nil {
			return res, err
		}
	}
	return res, nil
}

// moveCompartment ends the memberships of row rid that the new version's
// patients no longer include: they move to compartment_gone, ended at this
// write.
func (w *writer) moveCompartment(ctx context.Context, rid int64, patients []string) error {
	rows, err := w.stmts["compOf"].QueryContext(ctx, rid)
	if err != nil {
		return err
	}
	had, err := column[string](rows)
	if err != nil {
		return err
	}
	for _, p := range had {
		if slices.Contains(patients, p) {
			continue
		}
		if _, err := w.stmts["endComp"].ExecContext(ctx, w.lu, rid, p); err != nil {
			return err
		}
		if _, err := w.stmts["dropComp"].ExecContext(ctx, rid, p); err != nil {
			return err
		}
	}
	return nil
}

// flush writes the rows waiting for multi-row INSERTs.
func (w *writer) flush(ctx context.Context) error {
	for _, b := range bulkSQL {
		var rows *[]any
		switch b.name {
		case "res":
			rows = &w.resRows
		case "comp":
			rows = &w.compRows
		case "supp":
			rows = &w.suppRows
		case "access":
			rows = &w.accRows
		}
		vals := *rows
		per := b.cols * bulkRows
		for start := 0; start < len(vals); start += per {
			chunk := vals[start:min(start+per, len(vals))]
			n := len(chunk) / b.cols
			tuple := "(" + placeholders(b.cols) + ")"
			q := b.head + strings.Repeat(tuple+",", n-1) + tuple
			if _, err := w.tx.ExecContext(ctx, q, chunk...); err != nil {
				return fmt.Errorf("insert %s rows: %w", b.name, err)
			}
		}
		*rows = vals[:0]
	}
	for _, c := range w.cur {
		c.pending = false
	}
	return nil
}

// Read implements kiln.ResourceStore.
func (db *DB) Read(ctx context.Context, typ, id string) (*kiln.Resource, error) {
	r := kiln.Resource{Type: typ, ID: id}
	var lu int64
	err := db.read.QueryRowContext(ctx, `SELECT version, lu, deleted, body FROM resources WHERE type=? AND id=?`, typ, id).
		Scan(&r.Version, &lu, &r.Deleted, &r.Body)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "%s/%s is not known", typ, id)
	}
	if err != nil {
		return nil, fmt.Errorf("read %s/%s: %w", typ, id, err)
	}
	r.LastUpdated = fromMS(lu)
	if r.Deleted {
		return &r, kiln.Errorf(kiln.EGONE, "%s/%s was deleted", typ, id)
	}
	return &r, nil
}

// ReadVersion implements kiln.ResourceStore.
func (db *DB) ReadVersion(ctx context.Context, typ, id string, version int64) (*kiln.Resource, error) {
	r := kiln.Resource{Type: typ, ID: id, Version: version}
	var lu int64
	err := db.read.QueryRowContext(ctx, `SELECT lu, deleted, body FROM resources WHERE type=? AND id=? AND version=?
		UNION ALL SELECT lu, deleted, body FROM history WHERE type=? AND id=? AND version=?`, typ, id, version, typ, id, version).
		Scan(&lu, &r.Deleted, &r.Body)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "%s/%s has no version %d", typ, id, version)
	}
	if err != nil {
		return nil, fmt.Errorf("read %s/%s version %d: %w", typ, id, version, err)
	}
	r.LastUpdated = fromMS(lu)
	if r.Deleted {
		return &r, kiln.Errorf(kiln.EGONE, "version %d of %s/%s is a deletion", version, typ, id)
	}
	return &r, nil
}

// History implements kiln.ResourceStore.
func (db *DB) History(ctx context.Context, typ, id string) ([]kiln.Resource, error) {
	rows, err := db.read.QueryContext(ctx, `SELECT version, lu, deleted, body FROM resources WHERE type=? AND id=?
		UNION ALL SELECT version, lu, deleted, body FROM history WHERE type=? AND id=? ORDER BY 1 DESC`, typ, id, typ, id)
	if err != nil {
		return nil, fmt.Errorf("history %s/%s: %w", typ, id, err)
	}
	defer rows.Close()
	var out []kiln.Resource
	for rows.Next() {
		r := kiln.Resource{Type: typ, ID: id}
		var lu int64
		if err := rows.Scan(&r.Version, &lu, &r.Deleted, &r.Body); err != nil {
			return nil, fmt.Errorf("history %s/%s: %w", typ, id, err)
		}
		r.LastUpdated = fromMS(lu)
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("history %s/%s: %w", typ, id, err)
	}
	if len(out) == 0 {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "%s/%s is not known", typ, id)
	}
	return out, nil
}

// Search implements kiln.ResourceStore.
func (db *DB) Search(ctx context.Context, q kiln.SearchQuery) (*kiln.SearchPage, error) {
	where := []string{"type=?", "deleted=0"}
	args := []any{q.Type}
	if len(q.IDs) > 0 {
		where = append(where, "id IN ("+placeholders(len(q.IDs))+")")
		for _, id := range q.IDs {
			args = append(args, id)
		}
	}
	if !q.UpdatedAfter.IsZero() {
		op := ">"
		if q.UpdatedGE {
			op = ">="
		}
		where = append(where, "lu "+op+" ?")
		args = append(args, ms(q.UpdatedAfter))
	}
	if !q.UpdatedBefore.IsZero() {
		op := "<"
		if q.UpdatedLE {
			op = "<="
		}
		where = append(where, "lu "+op+" ?")
		args = append(args, ms(q.UpdatedBefore))
	}
	for _, ident := range q.Identifier {
		sys, val, hasSys := strings.Cut(ident, "|")
		if !hasSys {
			val, sys = ident, ""
		}
		cond := `EXISTS (SELECT 1 FROM json_each(CAST(body AS TEXT), '$.identifier') j WHERE json_extract(j.value, '$.value') = ?`
		a := []any{val}
		if hasSys {
			if sys == "" {
				cond += ` AND json_extract(j.value, '$.system') IS NULL`
			} else {
				cond += ` AND json_extract(j.value, '$.system') = ?`
				a = append(a, sys)
			}
		}
		where = append(where, cond+")")
		args = append(args, a...)
	}
	if q.AccessCodes != nil {
		acc, accArgs := accessCond(q.AccessCodes, "resources.rid")
		where = append(where, strings.TrimPrefix(acc, " AND "))
		args = append(args, accArgs...)
	}
	if q.Patients != nil {
		// "+type": the compartment's few rows lead, not a scan of the type's index.
		where[0] = "+type=?"
		where = append(where, "rid IN (SELECT rid FROM compartment WHERE type=? AND patient IN ("+placeholders(len(q.Patients))+"))")
		args = append(args, q.Type)
		for _, p := range q.Patients {
			args = append(args, p)
		}
	}
	page := &kiln.SearchPage{}
	cond := strings.Join(where, " AND ")
	if q.Total {
		if err := db.read.QueryRowContext(ctx, `SELECT count(*) FROM resources WHERE `+cond, args...).Scan(&page.Total); err != nil {
			return nil, fmt.Errorf("search %s: %w", q.Type, err)
		}
	}
	count := q.Count
	if count <= 0 {
		count = 50
	}
	rows, err := db.read.QueryContext(ctx, `SELECT rid, id, version, lu, body FROM resources WHERE `+cond+` AND rid > ? ORDER BY rid LIMIT ?`,
		append(args, q.After, count+1)...)
	if err != nil {
		return nil, fmt.Errorf("search %s: %w", q.Type, err)
	}
	defer rows.Close()
	for rows.Next() {
		var rid, lu int64
		r := kiln.Resource{Type: q.Type}
		if err := rows.Scan(&rid, &r.ID, &r.Version, &lu, &r.Body); err != nil {
			return nil, fmt.Errorf("search %s: %w", q.Type, err)
		}
		if len(page.Resources) == count {
			break
		}
		r.LastUpdated, r.Cursor = fromMS(lu), rid
		page.Resources = append(page.Resources, r)
		page.Next = rid
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("search %s: %w", q.Type, err)
	}
	if len(page.Resources) < count {
		page.Next = 0
	}
	return page, nil
}

// Counts implements kiln.ResourceStore.
func (db *DB) Counts(ctx context.Context) (map[string]int64, error) {
	rows, err := db.read.QueryContext(ctx, `SELECT type, count(*) FROM resources WHERE deleted=0 GROUP BY type`)
	if err != nil {
		return nil, fmt.Errorf("count resources: %w", err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var t string
		var n int64
		if err := rows.Scan(&t, &n); err != nil {
			return nil, fmt.Errorf("count resources: %w", err)
		}
		out[t] = n
	}
	return out, rows.Err()
}

// CompartmentOf implements kiln.ResourceStore.
func (db *DB) CompartmentOf(ctx context.Context, patient string) ([]kiln.Ref, error) {
	rows, err := db.read.QueryContext(ctx, `SELECT r.type, r.id FROM compartment c JOIN resources r ON r.rid=c.rid
		WHERE c.patient=? AND r.deleted=0 ORDER BY r.type, r.id`, patient)
	if err != nil {
		return nil, fmt.Errorf("compartment of %s: %w", patient, err)
	}
	defer rows.Close()
	var out []kiln.Ref
	for rows.Next() {
		var r kiln.Ref
		if err := rows.Scan(&r.Type, &r.ID); err != nil {
			return nil, fmt.Errorf("compartment of %s: %w", patient, err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func placeholders(n int) string {
	if n <= 0 {
		return ""
	}
	return strings.Repeat("?,", n-1) + "?"
}

var _ kiln.ResourceStore = (*DB)(nil)

// SetClock pins the lastUpdated clock to now (tests stamp writes at chosen instants).
func (db *DB) SetClock(now func() time.Time) { db.now = now }
