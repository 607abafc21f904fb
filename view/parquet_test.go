package view

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln/internal/duckdbtest"
)

// TestParquetReadByDuckDB: a view written as Parquet reads back in DuckDB
// with the column types the view declares, the same rows as the JSON output,
// and the same answers to typed queries.
func TestParquetReadByDuckDB(t *testing.T) {
	dir := duckdbtest.Dir(t)
	v, err := Parse([]byte(`{"resource":"Observation","select":[{"column":[
	 {"name":"id","path":"id","type":"id"},
	 {"name":"code","path":"code.coding.code.first()","type":"code"},
	 {"name":"value","path":"value.ofType(Quantity).value","type":"decimal"},
	 {"name":"n","path":"component.count()","type":"integer"},
	 {"name":"final","path":"status = 'final'","type":"boolean"},
	 {"name":"issued","path":"issued","type":"instant"},
	 {"name":"effective","path":"effective.ofType(dateTime)","type":"dateTime"},
	 {"name":"notes","path":"note.text","type":"string","collection":true},
	 {"name":"subject","path":"subject"}]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	var resources []map[string]any
	for _, s := range []string{
		`{"resourceType":"Observation","id":"o1","status":"final","code":{"coding":[{"code":"8867-4"}]},"valueQuantity":{"value":72.5},"issued":"2024-01-02T03:04:05.678+01:00","effectiveDateTime":"2024-01","note":[{"text":"a"},{"text":"b"}],"subject":{"reference":"Patient/p"}}`,
		`{"resourceType":"Observation","id":"o2","status":"amended","code":{"coding":[{"code":"8867-4"}]},"valueQuantity":{"value":60},"component":[{},{}]}`,
		`{"resourceType":"Observation","id":"o3","status":"final","code":{"coding":[{"code":"2339-0"}]}}`,
	} {
		d := json.NewDecoder(strings.NewReader(s))
		d.UseNumber()
		var m map[string]any
		if err := d.Decode(&m); err != nil {
			t.Fatal(err)
		}
		resources = append(resources, m)
	}
	var pq, js bytes.Buffer
	pw, err := NewWriter("parquet", &pq, v.Columns, false)
	if err != nil {
		t.Fatal(err)
	}
	jw, _ := NewWriter("json", &js, v.Columns, false)
	for _, r := range resources {
		rows, err := v.Rows(r)
		if err != nil {
			t.Fatal(err)
		}
		for _, row := range rows {
			if err := pw.Write(row); err != nil {
				t.Fatal(err)
			}
			jw.Write(row)
		}
	}
	if err := pw.Close(); err != nil {
		t.Fatal(err)
	}
	jw.Close()
	file := filepath.Join(t.TempDir(), "obs.parquet")
	os.WriteFile(file, pq.Bytes(), 0o644)
	from := "read_parquet('" + file + "')"

	types := map[string]string{}
	for _, r := range duckdbtest.Query(t, dir, "DESCRIBE SELECT * FROM "+from) {
		types[r["column_name"].(string)] = r["column_type"].(string)
	}
	wantTypes := map[string]string{"id": "VARCHAR", "code": "VARCHAR", "value": "DOUBLE", "n": "INTEGER", "final": "BOOLEAN",
		"issued": "TIMESTAMP WITH TIME ZONE", "effective": "VARCHAR", "notes": "VARCHAR[]", "subject": "VARCHAR"}
	if !reflect.DeepEqual(types, wantTypes) {
		t.Errorf("DuckDB column types %v\nwant %v", types, wantTypes)
	}
	cols := duckdbtest.Query(t, dir, "SELECT string_agg(column_name, ',') AS c FROM (DESCRIBE SELECT * FROM "+from+")")
	if cols[0]["c"] != "id,code,value,n,final,issued,effective,notes,subject" {
		t.Errorf("column order: %v", cols[0]["c"])
	}

	// The same rows as the JSON output (DuckDB's JSON of each value normalised).
	var want []map[string]any
	json.Unmarshal(js.Bytes(), &want)
	got := duckdbtest.Query(t, dir, "SELECT id, code, value, n, final, epoch_ms(issued) AS issued, effective, notes, subject FROM "+from+" ORDER BY id")
	if len(got) != len(want) {
		t.Fatalf("%d rows from Parquet, %d from JSON", len(got), len(want))
	}
	for i := range want {
		w, g := want[i], got[i]
		if w["issued"] != nil {
			w["issued"] = float64(1704161045678) // 2024-01-02T02:04:05.678Z
		}
		for k, wv := range w {
			gv := g[k]
			if k == "subject" && wv != nil {
				b, _ := json.Marshal(wv)
				wv = string(b)
			}
			if k == "n" || k == "issued" || k == "value" {
				if f, ok := gv.(string); ok { // DuckDB's JSON gives big numbers as text
					gv = f
					b, _ := json.Marshal(wv)
					wv = strings.Trim(string(b), `"`)
				}
			}
			if k == "notes" && gv == nil {
				gv = []any{}
			}
			if !reflect.DeepEqual(canon(gv), canon(wv)) {
				t.Errorf("row %s column %s: Parquet %#v, JSON %#v", w["id"], k, gv, wv)
			}
		}
	}

	// Typed queries give the JSON output's answers.
	perCode := duckdbtest.Query(t, dir, "SELECT code, count(*) AS n, sum(value) AS total FROM "+from+" GROUP BY code ORDER BY code")
	if len(perCode) != 2 || perCode[0]["code"] != "2339-0" || perCode[1]["code"] != "8867-4" ||
		perCode[1]["total"] != 132.5 || perCode[0]["total"] != nil {
		t.Errorf("per code: %v", perCode)
	}
	if r := duckdbtest.Query(t, dir, "SELECT count(*) FILTER (WHERE final) AS f, max(year(issued)) AS y FROM "+from); r[0]["f"] != "2" && r[0]["f"] != float64(2) || r[0]["y"] != float64(2024) && r[0]["y"] != "2024" {
		t.Errorf("typed aggregates: %v", r)
	}
}
