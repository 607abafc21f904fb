package postgres_test

import (
	"os"
	"testing"

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
	url(t)
	storetest.Run(t, func(t *testing.T) storetest.Store { return openSchema(t) })
}
