package sqlite

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"

	"github.com/kiln-fhir/kiln"
)

// Secret implements kiln.SecretStore (in the meta table, as hex).
func (db *DB) Secret(ctx context.Context, name string, size int) ([]byte, error) {
	fresh := make([]byte, size)
	rand.Read(fresh)
	key := "secret:" + name
	if _, err := db.exec(ctx, `INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO NOTHING`, key, hex.EncodeToString(fresh)); err != nil {
		return nil, fmt.Errorf("store secret %s: %w", name, err)
	}
	var v string
	if err := db.read.QueryRowContext(ctx, `SELECT value FROM meta WHERE key=?`, key).Scan(&v); err != nil {
		return nil, fmt.Errorf("read secret %s: %w", name, err)
	}
	b, err := hex.DecodeString(v)
	if err != nil || len(b) != size {
		return nil, fmt.Errorf("secret %s is damaged (%d bytes, want %d)", name, len(b), size)
	}
	return b, nil
}

var _ kiln.SecretStore = (*DB)(nil)
