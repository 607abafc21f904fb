// Package duckdbtest runs SQL in DuckDB for tests that read Kiln's Parquet
// back with an independent engine: DuckDB's Node.js package
// (@duckdb/node-api, with its binary inside), which scripts/test installs.
package duckdbtest

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Dir returns the folder holding @duckdb/node-api (npm install
// @duckdb/node-api in KILN_DUCKDB_DIR, default ~/.cache/kiln-duckdb). The
// test skips without it, unless KILN_REQUIRE_INTEGRATION is set.
func Dir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("KILN_DUCKDB_DIR")
	if dir == "" {
		home, _ := os.UserHomeDir()
		dir = filepath.Join(home, ".cache", "kiln-duckdb")
	}
	_, err := os.Stat(filepath.Join(dir, "node_modules", "@duckdb", "node-api", "package.json"))
	_, nodeErr := exec.LookPath("node")
	if err != nil || nodeErr != nil {
		msg := "DuckDB for node is not installed: npm install @duckdb/node-api in " + dir
		if os.Getenv("KILN_REQUIRE_INTEGRATION") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return dir
}

// Query runs SQL in DuckDB and returns the rows as JSON objects (DuckDB's
// JSON: big integers and decimals may come as text).
func Query(t testing.TB, dir, sql string) []map[string]any {
	t.Helper()
	script := `const {DuckDBInstance} = require(process.argv[1] + '/node_modules/@duckdb/node-api');
(async () => {
  const db = await DuckDBInstance.create(':memory:');
  const c = await db.connect();
  const r = await c.runAndReadAll(process.argv[2]);
  process.stdout.write(JSON.stringify(r.getRowObjectsJson()));
})().catch(e => { console.error(e); process.exit(1); });`
	out, err := exec.Command("node", "-e", script, dir, sql).CombinedOutput()
	if err != nil {
		t.Fatalf("duckdb: %v\n%s", err, out)
	}
	var rows []map[string]any
	if err := json.Unmarshal(out, &rows); err != nil {
		t.Fatalf("duckdb output: %v\n%s", err, out)
	}
	return rows
}
