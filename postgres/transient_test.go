package postgres

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/kiln-fhir/kiln"
)

func TestTransient(t *testing.T) {
	db := &DB{}
	wrap := func(err error) error { return fmt.Errorf("postgres: scan Patient: %w", err) }
	for _, c := range []struct {
		err  error
		want bool
	}{
		{wrap(&pgconn.PgError{Code: "57P01", Message: "terminating connection due to administrator command"}), true},
		{&pgconn.PgError{Code: "57P03"}, true},
		{&pgconn.PgError{Code: "08006"}, true},
		{&pgconn.PgError{Code: "40001"}, true},
		{wrap(pgconn.ErrConnClosed), true},
		{wrap(&pgconn.PgError{Code: "23505"}), false}, // unique violation: a real error
		{&pgconn.PgError{Code: "42P01"}, false},       // undefined table
		{wrap(context.Canceled), false},
		{errors.New("decode unit: bad json"), false},
		{nil, false},
	} {
		if got := db.Transient(c.err); got != c.want {
			t.Errorf("Transient(%v) = %v, want %v", c.err, got, c.want)
		}
	}
	if !kiln.Transient(db, &pgconn.PgError{Code: "57P01"}) || kiln.Transient(struct{}{}, &pgconn.PgError{Code: "57P01"}) {
		t.Error("kiln.Transient does not consult the store")
	}
}
