package postgres

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

type current struct {
	rid, version int64
	deleted      bool
	hash         []byte
	pending      bool
}

type writer struct {
	tx      pgx.Tx
	lu      int64
	luText  string
	cur     map[kiln.Ref]*current
	newRIDs []int64
	resRows [][]any
	comp    [][]any
	access  [][]any
	supp    [3][]string
}

// Write implements kiln.ResourceStore: one transaction; new resources and
// index rows go in with COPY.
func (db *DB) Write(ctx context.Context, ws []kiln.Write) ([]kiln.WriteResult, error) {
	var out []kiln.WriteResult
	err := db.inTx(ctx, func(tx pgx.Tx) error {
		lu, err := db.tick(ctx, tx)
		if err != nil {
			return err
		}
		w := &writer{tx: tx, lu: lu, luText: fhir.FormatInstant(fromMS(lu))}
		if err := w.lookup(ctx, ws); err != nil {
			return err
		}
		out = make([]kiln.WriteResult, len(ws))
		for i := range ws {
			if out[i], err = w.apply(ctx, &ws[i]); err != nil {
				return err
			}
		}
		if err := w.flush(ctx); err != nil {
			return err
		}
		if db.events != nil {
			var changed []kiln.WriteResult
			for _, r := range out {
				if !r.Unchanged {
					changed = append(changed, r)
				}
			}
			if len(changed) > 0 {
				return insertMessages(ctx, tx, db.events.ResourcesWritten(changed))
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (w *writer) lookup(ctx context.Context, ws []kiln.Write) error {
	w.cur = make(map[kiln.Ref]*current, len(ws))
	types := make([]string, len(ws))
	ids := make([]string, len(ws))
	for i, wr := range ws {
		types[i], ids[i] = wr.Type, wr.ID
	}
	rows, err := w.tx.Query(ctx, `SELECT r.type, r.id, r.rid, r.version, r.deleted, r.hash FROM resources r
		JOIN unnest($1::text[], $2::text[]) AS k(type, id) ON r.type = k.type AND r.id = k.id`, types, ids)
	if err != nil {
		return fmt.Errorf("postgres: look up: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var ref kiln.Ref
		c := &current{}
		if err := rows.Scan(&ref.Type, &ref.ID, &c.rid, &c.version, &c.deleted, &c.hash); err != nil {
			return fmt.Errorf("postgres: look up: %w", err)
		}
		w.cur[ref] = c
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("postgres: look up: %w", err)
	}
	// Row ids for the new resources, in one round trip.
	n := 0
	for _, wr := range ws {
		if _, ok := w.cur[kiln.Ref{Type: wr.Type, ID: wr.ID}]; !ok && wr.Kind != kiln.Delete {
			n++
		}
	}
	if n > 0 {
		rows, err := w.tx.Query(ctx, `SELECT nextval('resources_rid_seq') FROM generate_series(1, $1)`, n)
		if err != nil {
			return fmt.Errorf("postgres: row ids: %w", err)
		}
		w.newRIDs, err = pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return fmt.Errorf("postgres: row ids: %w", err)
		}
	}
	return nil
}

func (w *writer) nextRID(ctx context.Context) (int64, error) {
	if len(w.newRIDs) == 0 {
		var rid int64
		if err := w.tx.QueryRow(ctx, `SELECT nextval('resources_rid_seq')`).Scan(&rid); err != nil {
			return 0, fmt.Errorf("postgres: row id: %w", err)
		}
		return rid, nil
	}
	rid := w.newRIDs[0]
	w.newRIDs = w.newRIDs[1:]
	return rid, nil
}

func (w *writer) apply(ctx context.Context, wr *kiln.Write) (kiln.WriteResult, error) {
	key := kiln.Ref{Type: wr.Type, ID: wr.ID}
	c := w.cur[key]
	exists := c != nil
	if exists && c.pending {
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
		if err := w.archive(ctx, cv.rid); err != nil {
			return res, err
		}
		if _, err := w.tx.Exec(ctx, `UPDATE resources SET version=$1, lu=$2, deleted=true, hash=NULL, body=NULL WHERE rid=$3`, res.Version, w.lu, cv.rid); err != nil {
			return res, fmt.Errorf("postgres: delete %s/%s: %w", wr.Type, wr.ID, err)
		}
		w.cur[key] = &current{rid: cv.rid, version: res.Version, deleted: true}
		res.LastUpdated = fromMS(w.lu)
		return res, nil
	}
	version := res.Version
	body := fhir.SpliceMeta(wr.Body, wr.MetaAt, wr.MetaEmpty, strconv.FormatInt(version, 10), w.luText)
	rid := cv.rid
	if step == kiln.StepUpdate {
		if err := w.archive(ctx, rid); err != nil {
			return res, err
		}
		if _, err := w.tx.Exec(ctx, `UPDATE resources SET version=$1, lu=$2, deleted=false, hash=$3, body=$4 WHERE rid=$5`, version, w.lu, wr.Hash, body, rid); err != nil {
			return res, fmt.Errorf("postgres: update %s/%s: %w", wr.Type, wr.ID, err)
		}
		// Memberships the new version ends move to compartment_gone, ended
		// now; the ones it keeps keep their since.
		if _, err := w.tx.Exec(ctx, `WITH gone AS (DELETE FROM compartment WHERE rid=$1 AND NOT (patient = ANY(coalesce($2::text[], '{}')))
			RETURNING patient, type, rid, since)
			INSERT INTO compartment_gone(patient, type, rid, since, until) SELECT patient, type, rid, since, $3 FROM gone ON CONFLICT DO NOTHING`,
			rid, wr.Patients, w.lu); err != nil {
			return res, fmt.Errorf("postgres: reindex %s/%s: %w", wr.Type, wr.ID, err)
		}
		if _, err := w.tx.Exec(ctx, `INSERT INTO compartment(patient, type, rid, since) SELECT DISTINCT unnest($1::text[]), $2, $3::bigint, $4::bigint ON CONFLICT DO NOTHING`,
			wr.Patients, wr.Type, rid, w.lu); err != nil {
			return res, fmt.Errorf("postgres: reindex %s/%s: %w", wr.Type, wr.ID, err)
		}
		if _, err := w.tx.Exec(ctx, `DELETE FROM access WHERE rid=$1`, rid); err != nil {
			return res, fmt.Errorf("postgres: reindex %s/%s: %w", wr.Type, wr.ID, err)
		}
		// pending: its new access rows wait for flush, which a second
		// write of it in this batch must come after.
		w.cur[key] = &current{rid: rid, version: version, hash: wr.Hash, pending: true}
	} else {
		var err error
		if rid, err = w.nextRID(ctx); err != nil {
			return res, err
		}
		w.resRows = append(w.resRows, []any{rid, wr.Type, wr.ID, version, w.lu, false, wr.Hash, body})
		w.cur[key] = &current{rid: rid, version: version, hash: wr.Hash, pending: true}
	}
	for _, p := range wr.Patients {
		if step != kiln.StepUpdate {
			w.comp = append(w.comp, []any{p, wr.Type, rid, w.lu})
		}
		for _, s := range wr.Supporting {
			w.addSupp(p, s.Type, s.ID)
		}
	}
	for _, p := range wr.PatientRefs {
		w.addSupp(p, wr.Type, wr.ID)
	}
	for _, code := range wr.AccessCodes {
		w.access = append(w.access, []any{code, rid})
	}
	res.Version, res.LastUpdated, res.Body = version, fromMS(w.lu), body
	return res, nil
}

func (w *writer) addSupp(p, typ, id string) {
	w.supp[0] = append(w.supp[0], p)
	w.supp[1] = append(w.supp[1], typ)
	w.supp[2] = append(w.supp[2], id)
}

func (w *writer) archive(ctx context.Context, rid int64) error {
	if _, err := w.tx.Exec(ctx, `INSERT INTO history(type, id, version, lu, deleted, body) SELECT type, id, version, lu, deleted, body FROM resources WHERE rid=$1`, rid); err != nil {
		return fmt.Errorf("postgres: archive: %w", err)
	}
	return nil
}

func (w *writer) flush(ctx context.Context) error {
	if len(w.resRows) > 0 {
		if _, err := w.tx.CopyFrom(ctx, pgx.Identifier{"resources"}, []string{"rid", "type", "id", "version", "lu", "deleted", "hash", "body"}, pgx.CopyFromRows(w.resRows)); err != nil {
			return fmt.Errorf("postgres: copy resources: %w", err)
		}
		w.resRows = w.resRows[:0]
	}
	if len(w.comp) > 0 {
		if _, err := w.tx.CopyFrom(ctx, pgx.Identifier{"compartment"}, []string{"patient", "type", "rid", "since"}, pgx.CopyFromRows(w.comp)); err != nil {
			return fmt.Errorf("postgres: copy compartment: %w", err)
		}
		w.comp = w.comp[:0]
	}
	if len(w.access) > 0 {
		if _, err := w.tx.CopyFrom(ctx, pgx.Identifier{"access"}, []string{"code", "rid"}, pgx.CopyFromRows(w.access)); err != nil {
			return fmt.Errorf("postgres: copy access: %w", err)
		}
		w.access = w.access[:0]
	}
	if len(w.supp[0]) > 0 {
		// Supporting rows repeat across resources and batches: no COPY, skip duplicates.
		if _, err := w.tx.Exec(ctx, `INSERT INTO supporting(patient, type, id) SELECT DISTINCT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING`,
			w.supp[0], w.supp[1], w.supp[2]); err != nil {
			return fmt.Errorf("postgres: supporting: %w", err)
		}
		w.supp = [3][]string{}
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
	err := db.pool.QueryRow(ctx, `SELECT version, lu, deleted, body FROM resources WHERE type=$1 AND id=$2`, typ, id).Scan(&r.Version, &lu, &r.Deleted, &r.Body)
	if notFound(err) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "%s/%s is not known", typ, id)
	}
	if err != nil {
		return nil, fmt.Errorf("postgres: read %s/%s: %w", typ, id, err)
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
	err := db.pool.QueryRow(ctx, `SELECT lu, deleted, body FROM resources WHERE type=$1 AND id=$2 AND version=$3
		UNION ALL SELECT lu, deleted, body FROM history WHERE type=$1 AND id=$2 AND version=$3`, typ, id, version).Scan(&lu, &r.Deleted, &r.Body)
	if notFound(err) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "%s/%s has no version %d", typ, id, version)
	}
	if err != nil {
		return nil, fmt.Errorf("postgres: read %s/%s version %d: %w", typ, id, version, err)
	}
	r.LastUpdated = fromMS(lu)
	if r.Deleted {
		return &r, kiln.Errorf(kiln.EGONE, "version %d of %s/%s is a deletion", version, typ, id)
	}
	return &r, nil
}

// History implements kiln.ResourceStore.
func (db *DB) History(ctx context.Context, typ, id string) ([]kiln.Resource, error) {
	rows, err := db.pool.Query(ctx, `SELECT version, lu, deleted, body FROM resources WHERE type=$1 AND id=$2
		UNION ALL SELECT version, lu, deleted, body FROM history WHERE type=$1 AND id=$2 ORDER BY 1 DESC`, typ, id)
	if err != nil {
		return nil, fmt.Errorf("postgres: history %s/%s: %w", typ, id, err)
	}
	defer rows.Close()
	var out []kiln.Resource
	for rows.Next() {
		r := kiln.Resource{Type: typ, ID: id}
		var lu int64
		if err := rows.Scan(&r.Version, &lu, &r.Deleted, &r.Body); err != nil {
			return nil, fmt.Errorf("postgres: history %s/%s: %w", typ, id, err)
		}
		r.LastUpdated = fromMS(lu)
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("postgres: history %s/%s: %w", typ, id, err)
	}
	if len(out) == 0 {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "%s/%s is not known", typ, id)
	}
	return out, nil
}

// Search implements kiln.ResourceStore.
func (db *DB) Search(ctx context.Context, q kiln.SearchQuery) (*kiln.SearchPage, error) {
	where := []string{"type=$1", "NOT deleted"}
	args := []any{q.Type}
	arg := func(v any) string {
		args = append(args, v)
		return "$" + strconv.Itoa(len(args))
	}
	if len(q.IDs) > 0 {
		where = append(where, "id = ANY("+arg(q.IDs)+"::text[])")
	}
	if !q.UpdatedAfter.IsZero() {
		op := ">"
		if q.UpdatedGE {
			op = ">="
		}
		where = append(where, "lu "+op+" "+arg(ms(q.UpdatedAfter)))
	}
	if !q.UpdatedBefore.IsZero() {
		op := "<"
		if q.UpdatedLE {
			op = "<="
		}
		where = append(where, "lu "+op+" "+arg(ms(q.UpdatedBefore)))
	}
	for _, ident := range q.Identifier {
		sys, val, hasSys := strings.Cut(ident, "|")
		if !hasSys {
			val, sys = ident, ""
		}
		cond := `EXISTS (SELECT 1 FROM jsonb_array_elements(convert_from(body, 'UTF8')::jsonb -> 'identifier') j WHERE j->>'value' = ` + arg(val)
		if hasSys {
			if sys == "" {
				cond += ` AND j->>'system' IS NULL`
			} else {
				cond += ` AND j->>'system' = ` + arg(sys)
			}
		}
		where = append(where, cond+")")
	}
	if q.AccessCodes != nil {
		where = append(where, "EXISTS (SELECT 1 FROM access a WHERE a.rid = resources.rid AND a.code = ANY("+arg(q.AccessCodes)+"::text[]))")
	}
	if q.Patients != nil {
		where = append(where, "rid IN (SELECT rid FROM compartment WHERE type=$1 AND patient = ANY("+arg(q.Patients)+"::text[]))")
	}
	cond := strings.Join(where, " AND ")
	page := &kiln.SearchPage{}
	if q.Total {
		if err := db.pool.QueryRow(ctx, `SELECT count(*) FROM resources WHERE `+cond, args...).Scan(&page.Total); err != nil {
			return nil, fmt.Errorf("postgres: search %s: %w", q.Type, err)
		}
	}
	count := q.Count
	if count <= 0 {
		count = 50
	}
	after, limit := arg(q.After), arg(count+1)
	rows, err := db.pool.Query(ctx, `SELECT rid, id, version, lu, body FROM resources WHERE `+cond+` AND rid > `+after+` ORDER BY rid LIMIT `+limit, args...)
	if err != nil {
		return nil, fmt.Errorf("postgres: search %s: %w", q.Type, err)
	}
	defer rows.Close()
	for rows.Next() {
		var rid, lu int64
		r := kiln.Resource{Type: q.Type}
		if err := rows.Scan(&rid, &r.ID, &r.Version, &lu, &r.Body); err != nil {
			return nil, fmt.Errorf("postgres: search %s: %w", q.Type, err)
		}
		if len(page.Resources) == count {
			break
		}
		r.LastUpdated, r.Cursor = fromMS(lu), rid
		page.Resources = append(page.Resources, r)
		page.Next = rid
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("postgres: search %s: %w", q.Type, err)
	}
	if len(page.Resources) < count {
		page.Next = 0
	}
	return page, nil
}

// Counts implements kiln.ResourceStore.
func (db *DB) Counts(ctx context.Context) (map[string]int64, error) {
	rows, err := db.pool.Query(ctx, `SELECT type, count(*) FROM resources WHERE NOT deleted GROUP BY type`)
	if err != nil {
		return nil, fmt.Errorf("postgres: count: %w", err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var t string
		var n int64
		if err := rows.Scan(&t, &n); err != nil {
			return nil, err
		}
		out[t] = n
	}
	return out, rows.Err()
}

// CompartmentOf implements kiln.ResourceStore.
func (db *DB) CompartmentOf(ctx context.Context, patient string) ([]kiln.Ref, error) {
	rows, err := db.pool.Query(ctx, `SELECT r.type, r.id FROM compartment c JOIN resources r ON r.rid=c.rid
		WHERE c.patient=$1 AND NOT r.deleted ORDER BY r.type, r.id`, patient)
	if err != nil {
		return nil, fmt.Errorf("postgres: compartment of %s: %w", patient, err)
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (kiln.Ref, error) {
		var r kiln.Ref
		err := row.Scan(&r.Type, &r.ID)
		return r, err
	})
}

var _ kiln.ResourceStore = (*DB)(nil)
