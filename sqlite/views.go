package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/kiln-fhir/kiln"
)

// PutView implements kiln.ViewStore.
func (db *DB) PutView(ctx context.Context, id string, body []byte) (*kiln.StoredView, error) {
	v := &kiln.StoredView{ID: id, Body: body}
	var updated int64
	db.mu.Lock()
	defer db.mu.Unlock()
	err := db.write.QueryRowContext(ctx, `INSERT INTO views(id, version, updated, body) VALUES(?, 1, ?, ?)
		ON CONFLICT(id) DO UPDATE SET version=views.version+1, updated=excluded.updated, body=excluded.body
		RETURNING version, updated`, id, ms(db.now()), body).Scan(&v.Version, &updated)
	if err != nil {
		return nil, fmt.Errorf("store view %s: %w", id, err)
	}
	v.Updated = fromMS(updated)
	return v, nil
}

// GetView implements kiln.ViewStore.
func (db *DB) GetView(ctx context.Context, id string) (*kiln.StoredView, error) {
	v := &kiln.StoredView{ID: id}
	var updated int64
	err := db.read.QueryRowContext(ctx, `SELECT version, updated, body FROM views WHERE id=?`, id).Scan(&v.Version, &updated, &v.Body)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "ViewDefinition/%s is not known", id)
	}
	if err != nil {
		return nil, fmt.Errorf("read view %s: %w", id, err)
	}
	v.Updated = fromMS(updated)
	return v, nil
}

// Views implements kiln.ViewStore.
func (db *DB) Views(ctx context.Context) ([]*kiln.StoredView, error) {
	rows, err := db.read.QueryContext(ctx, `SELECT id, version, updated, body FROM views ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list views: %w", err)
	}
	defer rows.Close()
	var out []*kiln.StoredView
	for rows.Next() {
		v := &kiln.StoredView{}
		var updated int64
		if err := rows.Scan(&v.ID, &v.Version, &updated, &v.Body); err != nil {
			return nil, fmt.Errorf("list views: %w", err)
		}
		v.Updated = fromMS(updated)
		out = append(out, v)
	}
	return out, rows.Err()
}

// DeleteView implements kiln.ViewStore.
func (db *DB) DeleteView(ctx context.Context, id string) error {
	r, err := db.exec(ctx, `DELETE FROM views WHERE id=?`, id)
	if err != nil {
		return fmt.Errorf("delete view %s: %w", id, err)
	}
	if n, _ := r.RowsAffected(); n == 0 {
		return kiln.Errorf(kiln.ENOTFOUND, "ViewDefinition/%s is not known", id)
	}
	return nil
}

var _ kiln.ViewStore = (*DB)(nil)
