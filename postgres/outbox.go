package postgres

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/kiln-fhir/kiln"
)

func insertMessages(ctx context.Context, tx pgx.Tx, msgs []kiln.Message) error {
	for _, m := range msgs {
		h, err := json.Marshal(m.Headers)
		if err != nil {
			return fmt.Errorf("encode event headers: %w", err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO outbox(topic, key, value, headers) VALUES($1, $2, $3, $4)`, m.Topic, m.Key, m.Value, h); err != nil {
			return fmt.Errorf("postgres: write outbox: %w", err)
		}
	}
	return nil
}

// PendingMessages implements kiln.Outbox.
func (db *DB) PendingMessages(ctx context.Context, limit int) ([]kiln.Message, error) {
	rows, err := db.pool.Query(ctx, `SELECT seq, topic, key, value, headers FROM outbox ORDER BY seq LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("postgres: read outbox: %w", err)
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (kiln.Message, error) {
		var m kiln.Message
		err := row.Scan(&m.Seq, &m.Topic, &m.Key, &m.Value, &m.Headers)
		return m, err
	})
}

// DeleteMessages implements kiln.Outbox.
func (db *DB) DeleteMessages(ctx context.Context, seqs []int64) error {
	if _, err := db.pool.Exec(ctx, `DELETE FROM outbox WHERE seq = ANY($1::bigint[])`, seqs); err != nil {
		return fmt.Errorf("postgres: delete outbox messages: %w", err)
	}
	return nil
}

// OutboxSize implements kiln.Outbox.
func (db *DB) OutboxSize(ctx context.Context) (int, error) {
	var n int
	if err := db.pool.QueryRow(ctx, `SELECT count(*) FROM outbox`).Scan(&n); err != nil {
		return 0, fmt.Errorf("postgres: count outbox: %w", err)
	}
	return n, nil
}

var _ kiln.Outbox = (*DB)(nil)
