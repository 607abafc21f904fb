package postgres

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kiln-fhir/kiln"
)

// PutClient implements kiln.ClientStore.
func (db *DB) PutClient(ctx context.Context, c *kiln.Client) error {
	doc, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("encode client: %w", err)
	}
	if _, err := db.pool.Exec(ctx, `INSERT INTO clients(id, doc) VALUES($1, $2) ON CONFLICT(id) DO UPDATE SET doc=excluded.doc`, c.ID, doc); err != nil {
		return fmt.Errorf("postgres: put client: %w", err)
	}
	return nil
}

// GetClient implements kiln.ClientStore.
func (db *DB) GetClient(ctx context.Context, id string) (*kiln.Client, error) {
	var c kiln.Client
	err := db.pool.QueryRow(ctx, `SELECT doc FROM clients WHERE id=$1`, id).Scan(&c)
	if notFound(err) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "client %s is not registered", id)
	}
	if err != nil {
		return nil, fmt.Errorf("postgres: read client: %w", err)
	}
	return &c, nil
}

// Clients implements kiln.ClientStore.
func (db *DB) Clients(ctx context.Context) ([]*kiln.Client, error) {
	rows, err := db.pool.Query(ctx, `SELECT doc FROM clients ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("postgres: list clients: %w", err)
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (*kiln.Client, error) {
		var c kiln.Client
		err := row.Scan(&c)
		return &c, err
	})
}

// DeleteClient implements kiln.ClientStore.
func (db *DB) DeleteClient(ctx context.Context, id string) error {
	tag, err := db.pool.Exec(ctx, `DELETE FROM clients WHERE id=$1`, id)
	if err != nil {
		return fmt.Errorf("postgres: delete client: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return kiln.Errorf(kiln.ENOTFOUND, "client %s is not registered", id)
	}
	return nil
}

var _ kiln.ClientStore = (*DB)(nil)

// UseAssertion implements kiln.ClientStore.
func (db *DB) UseAssertion(ctx context.Context, key string, expires time.Time) (bool, error) {
	if _, err := db.pool.Exec(ctx, `DELETE FROM assertions WHERE expires < $1`, time.Now().UnixMilli()); err != nil {
		return false, fmt.Errorf("postgres: prune used assertions: %w", err)
	}
	tag, err := db.pool.Exec(ctx, `INSERT INTO assertions(key, expires) VALUES($1, $2) ON CONFLICT(key) DO NOTHING`, key, expires.UnixMilli())
	if err != nil {
		return false, fmt.Errorf("postgres: record assertion: %w", err)
	}
	return tag.RowsAffected() == 1, nil
}
