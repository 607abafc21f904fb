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

// PutClient implements kiln.ClientStore.
func (db *DB) PutClient(ctx context.Context, c *kiln.Client) error {
	doc, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("encode client: %w", err)
	}
	_, err = db.exec(ctx, `INSERT INTO clients(id, doc) VALUES(?, ?) ON CONFLICT(id) DO UPDATE SET doc=excluded.doc`, c.ID, doc)
	return err
}

// GetClient implements kiln.ClientStore.
func (db *DB) GetClient(ctx context.Context, id string) (*kiln.Client, error) {
	var doc []byte
	err := db.read.QueryRowContext(ctx, `SELECT doc FROM clients WHERE id=?`, id).Scan(&doc)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "client %s is not registered", id)
	}
	if err != nil {
		return nil, fmt.Errorf("read client: %w", err)
	}
	var c kiln.Client
	if err := json.Unmarshal(doc, &c); err != nil {
		return nil, fmt.Errorf("decode client: %w", err)
	}
	return &c, nil
}

// Clients implements kiln.ClientStore.
func (db *DB) Clients(ctx context.Context) ([]*kiln.Client, error) {
	rows, err := db.read.QueryContext(ctx, `SELECT doc FROM clients ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list clients: %w", err)
	}
	return decodeDocs[kiln.Client](rows, "client")
}

// DeleteClient implements kiln.ClientStore.
func (db *DB) DeleteClient(ctx context.Context, id string) error {
	r, err := db.exec(ctx, `DELETE FROM clients WHERE id=?`, id)
	if err != nil {
		return err
	}
	if n, _ := r.RowsAffected(); n == 0 {
		return kiln.Errorf(kiln.ENOTFOUND, "client %s is not registered", id)
	}
	return nil
}

var _ kiln.ClientStore = (*DB)(nil)

// UseAssertion implements kiln.ClientStore.
func (db *DB) UseAssertion(ctx context.Context, key string, expires time.Time) (bool, error) {
	if _, err := db.exec(ctx, `DELETE FROM assertions WHERE expires < ?`, ms(db.now())); err != nil {
		return false, fmt.Errorf("prune used assertions: %w", err)
	}
	res, err := db.exec(ctx, `INSERT INTO assertions(key, expires) VALUES(?, ?) ON CONFLICT(key) DO NOTHING`, key, ms(expires))
	if err != nil {
		return false, fmt.Errorf("record assertion: %w", err)
	}
	n, err := res.RowsAffected()
	return n == 1, err
}
