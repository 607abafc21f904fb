package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	_ "modernc.org/sqlite" // the raw limits use the same SQLite driver as the store
)

// limit is a measurement of what the machine and the store can do without
// Kiln, taken in the same run as Kiln's phases: each phase is shown as a
// ratio to one of them.
type limit struct {
	name      string
	resources int64
	d         time.Duration
}

func (l limit) rate() float64 { return float64(l.resources) / l.d.Seconds() }

// copyLimit copies the generated NDJSON files into one file: what the page
// cache and the disk allow for the bytes an export writes.
func copyLimit(genDir, out string) (limit, error) {
	files, err := filepath.Glob(filepath.Join(genDir, "*.ndjson"))
	if err != nil {
		return limit{}, err
	}
	dst, err := os.Create(out)
	if err != nil {
		return limit{}, err
	}
	defer os.Remove(out)
	defer dst.Close()
	start := time.Now()
	var lines int64
	buf := make([]byte, 1<<20)
	for _, f := range files {
		src, err := os.Open(f)
		if err != nil {
			return limit{}, err
		}
		for {
			n, err := src.Read(buf)
			lines += int64(bytes.Count(buf[:n], []byte{'\n'}))
			if _, werr := dst.Write(buf[:n]); werr != nil {
				src.Close()
				return limit{}, werr
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				src.Close()
				return limit{}, err
			}
		}
		src.Close()
	}
	return limit{"file copy", lines, time.Since(start)}, nil
}

// eachLine calls fn with the type, id and body of every line of the
// generated files (the id found by a byte search, not a JSON decode: the
// limit is the store's, not a parser's).
func eachLine(genDir string, fn func(typ, id string, body []byte) error) (int64, error) {
	files, err := filepath.Glob(filepath.Join(genDir, "*.ndjson"))
	if err != nil {
		return 0, err
	}
	var n int64
	for _, f := range files {
		typ := strings.TrimSuffix(filepath.Base(f), ".ndjson")
		src, err := os.Open(f)
		if err != nil {
			return n, err
		}
		sc := bufio.NewScanner(src)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			line := sc.Bytes()
			id := ""
			if i := bytes.Index(line, []byte(`"id":"`)); i >= 0 {
				rest := line[i+6:]
				if j := bytes.IndexByte(rest, '"'); j >= 0 {
					id = string(rest[:j])
				}
			}
			if err := fn(typ, id, line); err != nil {
				src.Close()
				return n, err
			}
			n++
		}
		src.Close()
		if err := sc.Err(); err != nil {
			return n, err
		}
	}
	return n, nil
}

// sqliteInsertLimit inserts every generated body, one thread, one
// transaction, prepared statement, into a fresh SQLite table with Kiln's
// two indexes (type+id unique, type+lastUpdated).
func sqliteInsertLimit(ctx context.Context, genDir, dir string) (limit, error) {
	path := filepath.Join(dir, "raw-insert.db")
	defer os.Remove(path)
	defer os.Remove(path + "-wal")
	defer os.Remove(path + "-shm")
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)")
	if err != nil {
		return limit{}, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	for _, q := range []string{
		`CREATE TABLE raw(rid INTEGER PRIMARY KEY, type TEXT NOT NULL, id TEXT NOT NULL, lu INTEGER NOT NULL, body BLOB)`,
		`CREATE UNIQUE INDEX raw_type_id ON raw(type, id)`,
		`CREATE INDEX raw_type_lu ON raw(type, lu)`,
	} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			return limit{}, err
		}
	}
	start := time.Now()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return limit{}, err
	}
	defer tx.Rollback()
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO raw(type, id, lu, body) VALUES (?, ?, ?, ?)`)
	if err != nil {
		return limit{}, err
	}
	lu := time.Now().UnixMilli()
	n, err := eachLine(genDir, func(typ, id string, body []byte) error {
		_, err := stmt.ExecContext(ctx, typ, id, lu, body)
		return err
	})
	if err != nil {
		return limit{}, fmt.Errorf("raw insert: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return limit{}, err
	}
	return limit{"raw insert", n, time.Since(start)}, nil
}

// sqliteScanLimit reads every current body out of Kiln's own database in
// (type, lastUpdated) order, one goroutine, and writes them to a file.
func sqliteScanLimit(ctx context.Context, dbPath, out string) (limit, error) {
	db, err := sql.Open("sqlite", "file:"+dbPath+"?_pragma=query_only(1)")
	if err != nil {
		return limit{}, err
	}
	defer db.Close()
	dst, err := os.Create(out)
	if err != nil {
		return limit{}, err
	}
	defer os.Remove(out)
	defer dst.Close()
	w := bufio.NewWriterSize(dst, 1<<20)
	start := time.Now()
	rows, err := db.QueryContext(ctx, `SELECT body FROM resources INDEXED BY resources_type_lu WHERE deleted=0 ORDER BY type, lu`)
	if err != nil {
		return limit{}, err
	}
	defer rows.Close()
	var n int64
	for rows.Next() {
		var body sql.RawBytes
		if err := rows.Scan(&body); err != nil {
			return limit{}, err
		}
		w.Write(body)
		w.WriteByte('\n')
		n++
	}
	if err := rows.Err(); err != nil {
		return limit{}, err
	}
	if err := w.Flush(); err != nil {
		return limit{}, err
	}
	return limit{"raw scan", n, time.Since(start)}, nil
}

// pgLimits are PostgreSQL's own bulk paths for the same rows: COPY FROM
// STDIN into a fresh table with Kiln's two indexes, and COPY (SELECT body
// … ORDER BY type, lu) TO STDOUT of Kiln's table.
func pgInsertLimit(ctx context.Context, url, schema, genDir string) (limit, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return limit{}, err
	}
	defer conn.Close(ctx)
	table := pgx.Identifier{schema, "raw_insert_limit"}.Sanitize()
	for _, q := range []string{
		`DROP TABLE IF EXISTS ` + table,
		`CREATE TABLE ` + table + `(rid BIGSERIAL PRIMARY KEY, type TEXT NOT NULL, id TEXT NOT NULL, lu BIGINT NOT NULL, body BYTEA, UNIQUE(type, id))`,
		`CREATE INDEX ON ` + table + `(type, lu, rid)`,
	} {
		if _, err := conn.Exec(ctx, q); err != nil {
			return limit{}, err
		}
	}
	defer conn.Exec(context.WithoutCancel(ctx), `DROP TABLE IF EXISTS `+table)
	// The producer stops with the copy, also when the copy fails.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	lu := time.Now().UnixMilli()
	rows := make(chan []any, 1024)
	var n int64
	errc := make(chan error, 1)
	go func() {
		defer close(rows)
		var err error
		n, err = eachLine(genDir, func(typ, id string, body []byte) error {
			select {
			case rows <- []any{typ, id, lu, bytes.Clone(body)}:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
		errc <- err
	}()
	start := time.Now()
	_, err = conn.CopyFrom(ctx, pgx.Identifier{schema, "raw_insert_limit"}, []string{"type", "id", "lu", "body"}, pgx.CopyFromFunc(func() ([]any, error) {
		r, ok := <-rows
		if !ok {
			return nil, nil
		}
		return r, nil
	}))
	if err != nil {
		return limit{}, fmt.Errorf("COPY FROM: %w", err)
	}
	if err := <-errc; err != nil {
		return limit{}, err
	}
	return limit{"raw insert", n, time.Since(start)}, nil
}

func pgScanLimit(ctx context.Context, url, schema, out string) (limit, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return limit{}, err
	}
	defer conn.Close(ctx)
	dst, err := os.Create(out)
	if err != nil {
		return limit{}, err
	}
	defer os.Remove(out)
	defer dst.Close()
	cw := &lineCounter{w: bufio.NewWriterSize(dst, 1<<20)}
	start := time.Now()
	// Text COPY escapes bytea as hex; the binary body is what an export
	// writes, so the query converts it back to text first.
	q := `COPY (SELECT convert_from(body, 'UTF8') FROM ` + pgx.Identifier{schema, "resources"}.Sanitize() + ` WHERE NOT deleted ORDER BY type, lu) TO STDOUT`
	if _, err := conn.PgConn().CopyTo(ctx, cw, q); err != nil {
		return limit{}, fmt.Errorf("COPY TO: %w", err)
	}
	if err := cw.w.Flush(); err != nil {
		return limit{}, err
	}
	return limit{"raw scan", cw.lines, time.Since(start)}, nil
}

type lineCounter struct {
	w     *bufio.Writer
	lines int64
}

func (c *lineCounter) Write(p []byte) (int, error) {
	c.lines += int64(bytes.Count(p, []byte{'\n'}))
	return c.w.Write(p)
}
