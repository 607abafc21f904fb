package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"

	"github.com/kiln-fhir/kiln"
)

// SetEvents makes the store write outbox messages for job state changes and
// resource writes. Call it before the store is used.
func (db *DB) SetEvents(e kiln.Events) { db.events = e }

func insertMessages(ctx context.Context, tx *sql.Tx, msgs []kiln.Message) error {
	for _, m := range msgs {
		h, err := json.Marshal(m.Headers)
		if err != nil {
			return fmt.Errorf("encode event headers: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO outbox(topic, key, value, headers) VALUES(?, ?, ?, ?)`, m.Topic, m.Key, m.Value, h); err != nil {
			return fmt.Errorf("write outbox: %w", err)
		}
	}
	return nil
}

// PendingMessages implements kiln.Outbox.
func (db *DB) PendingMessages(ctx context.Context, limit int) ([]kiln.Message, error) {
	rows, err := db.read.QueryContext(ctx, `SELECT seq, topic, key, value, headers FROM outbox ORDER BY seq LIMIT ?`, limit)
	if err != nil {
		return nil, fmt.Errorf("read outbox: %w", err)
	}
	defer rows.Close()
	var out []kiln.Message
	for rows.Next() {
		var m kiln.Message
		var h []byte
		if err := rows.Scan(&m.Seq, &m.Topic, &m.Key, &m.Value, &h); err != nil {
			return nil, fmt.Errorf("read outbox: %w", err)
		}
		if err := json.Unmarshal(h, &m.Headers); err != nil {
			return nil, fmt.Errorf("decode event headers: %w", err)
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

// DeleteMessages implements kiln.Outbox.
func (db *DB) DeleteMessages(ctx context.Context, seqs []int64) error {
	return db.inTx(ctx, func(tx *sql.Tx) error {
		for _, s := range seqs {
			if _, err := tx.ExecContext(ctx, `DELETE FROM outbox WHERE seq = ?`, s); err != nil {
				return fmt.Errorf("delete outbox message: %w", err)
			}
		}
		return nil
	})
}

// OutboxSize implements kiln.Outbox.
func (db *DB) OutboxSize(ctx context.Context) (int, error) {
	var n int
	if err := db.read.QueryRowContext(ctx, `SELECT count(*) FROM outbox`).Scan(&n); err != nil {
		return 0, fmt.Errorf("count outbox: %w", err)
	}
	return n, nil
}

var _ kiln.Outbox = (*DB)(nil)
