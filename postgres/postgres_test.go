package postgres_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"testing"

	"github.com/kiln-fhir/kiln/postgres"
	"github.com/kiln-fhir/kiln/storetest"
)

// url is the PostgreSQL the tests use: KILN_POSTGRES_URL (scripts/test starts one).
func url(t *testing.T) string {
	u := os.Getenv("KILN_POSTGRES_URL")
	if u == "" {
		if os.Getenv("KILN_REQUIRE_INTEGRATION") == "1" {
			t.Fatal("KILN_POSTGRES_URL is not set, and KILN_REQUIRE_INTEGRATION=1")
		}
		t.Skip("KILN_POSTGRES_URL not set: no PostgreSQL to test against (scripts/test starts one)")
	}
	return u
}

func TestContract(t *testing.T) {
	u := url(t)
	storetest.Run(t, func(t *testing.T) storetest.Store {
		b := make([]byte, 6)
		rand.Read(b)
		schema := "test_" + hex.EncodeToString(b)
		db, err := postgres.Open(context.Background(), u, postgres.Options{Schema: schema})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			db.Close()
			postgres.DropSchema(context.Background(), u, schema)
		})
		return db
	})
}
