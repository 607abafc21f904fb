package postgres

import (
	"context"
	"crypto/rand"
	"fmt"

	"github.com/kiln-fhir/kiln"
)

// Secret implements kiln.SecretStore.
func (db *DB) Secret(ctx context.Context, name string, size int) ([]byte, error) {
	fresh := make([]byte, size)
	rand.Read(fresh)
	if _, err := db.pool.Exec(ctx, `INSERT INTO secrets(name, value) VALUES($1, $2) ON CONFLICT(name) DO NOTHING`, name, fresh); err != nil {
		return nil, fmt.Errorf("postgres: store secret %s: %w", name, err)
	}
	var b []byte
	if err := db.pool.QueryRow(ctx, `SELECT value FROM secrets WHERE name=$1`, name).Scan(&b); err != nil {
		return nil, fmt.Errorf("postgres: read secret %s: %w", name, err)
	}
	if len(b) != size {
		return nil, fmt.Errorf("postgres: secret %s is damaged (%d bytes, want %d)", name, len(b), size)
	}
	return b, nil
}

var _ kiln.SecretStore = (*DB)(nil)
