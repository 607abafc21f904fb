package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kiln-fhir/kiln"
)

// Lead implements kiln.Elector with a leader row and a lease on the
// database's clock: holder takes the row when it is free or expired, and
// keeps it by renewing before the lease runs out.
func (db *DB) Lead(ctx context.Context, name, holder string, ttl time.Duration) (bool, error) {
	var got string
	err := db.pool.QueryRow(ctx, `INSERT INTO leaders(name, holder, expires) VALUES($1, $2, `+dbNow+` + $3)
		ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires = EXCLUDED.expires
		WHERE leaders.holder = EXCLUDED.holder OR leaders.expires < `+dbNow+`
		RETURNING holder`, name, holder, ttl.Milliseconds()).Scan(&got)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil // another holder's lease is current
	}
	if err != nil {
		return false, fmt.Errorf("postgres: lead %s: %w", name, err)
	}
	return got == holder, nil
}

// Resign implements kiln.Elector.
func (db *DB) Resign(ctx context.Context, name, holder string) error {
	if _, err := db.pool.Exec(ctx, `DELETE FROM leaders WHERE name=$1 AND holder=$2`, name, holder); err != nil {
		return fmt.Errorf("postgres: resign %s: %w", name, err)
	}
	return nil
}

var _ kiln.Elector = (*DB)(nil)
