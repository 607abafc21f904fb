package view

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// specDir is the SQL on FHIR v2 test suite, beside the repository.
func specDir(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"../../shared/data/sql-on-fhir-v2-tests", "../shared/data/sql-on-fhir-v2-tests"} {
		if _, err := os.Stat(filepath.Join(p, "basic.json")); err == nil {
			return p
		}
	}
	t.Fatal("the SQL on FHIR v2 test suite is not beside the repository (../shared/data/sql-on-fhir-v2-tests)")
	return ""
}

type specFile struct {
	Title     string           `json:"title"`
	Resources []map[string]any `json:"resources"`
	Tests     []struct {
		Title         string           `json:"title"`
		Tags          []string         `json:"tags"`
		View          map[string]any   `json:"view"`
		Expect        []map[string]any `json:"expect"`
		ExpectColumns []string         `json:"expectColumns"`
		ExpectError   bool             `json:"expectError"`
	} `json:"tests"`
}

// runView compiles and runs a view over resources; rows as column → value.
func runView(def map[string]any, resources []map[string]any) ([]string, []map[string]any, error) {
	v, err := Compile(def)
	if err != nil {
		return nil, nil, err
	}
	var names []string
	for _, c := range v.Columns {
		names = append(names, c.Name)
	}
	var out []map[string]any
	for _, r := range resources {
		rows, err := v.Rows(r)
		if err != nil {
			return names, nil, err
		}
		for _, row := range rows {
			m := map[string]any{}
			for i, c := range v.Columns {
				m[c.Name] = row[i]
			}
			out = append(out, m)
		}
	}
	return names, out, nil
}

// canon gives a row a comparable form: numbers as float64, keys sorted.
func canon(v any) any {
	switch x := v.(type) {
	case json.Number:
		f, _ := strconv.ParseFloat(string(x), 64)
		return f
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = canon(e)
		}
		return out
	case map[string]any:
		out := map[string]any{}
		for k, e := range x {
			out[k] = canon(e)
		}
		return out
	}
	return v
}

func rowSet(rows []map[string]any) []string {
	var out []string
	for _, r := range rows {
		b, _ := json.Marshal(canon(r))
		out = append(out, string(b))
	}
	sort.Strings(out)
	return out
}

// TestSpecSuite runs the SQL on FHIR v2 specification's own tests: every
// test tagged shareable must pass; the others are counted and reported.
func TestSpecSuite(t *testing.T) {
	dir := specDir(t)
	files, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	type count struct{ pass, total int }
	tags := map[string]*count{}
	var failed []string
	n := 0
	for _, f := range files {
		if strings.HasSuffix(f, "tests.schema.json") {
			continue
		}
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.UseNumber()
		var sf specFile
		if err := dec.Decode(&sf); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, tc := range sf.Tests {
			n++
			names, rows, err := runView(tc.View, sf.Resources)
			var problem string
			switch {
			case tc.ExpectError:
				if err == nil {
					problem = "the view was accepted and ran; the test expects an error"
				}
			case err != nil:
				problem = err.Error()
			case tc.ExpectColumns != nil && !slices.Equal(names, tc.ExpectColumns):
				problem = fmt.Sprintf("columns %v, want %v", names, tc.ExpectColumns)
			default:
				got, want := rowSet(rows), rowSet(tc.Expect)
				if !slices.Equal(got, want) {
					problem = fmt.Sprintf("rows\n\t%s\nwant\n\t%s", strings.Join(got, "\n\t"), strings.Join(want, "\n\t"))
				}
			}
			name := filepath.Base(f) + ": " + tc.Title
			for _, tag := range tc.Tags {
				if tags[tag] == nil {
					tags[tag] = &count{}
				}
				tags[tag].total++
				if problem == "" {
					tags[tag].pass++
				}
			}
			if problem != "" {
				if slices.Contains(tc.Tags, "shareable") {
					failed = append(failed, name+": "+problem)
				} else {
					t.Logf("not passed (%v): %s: %s", tc.Tags, name, problem)
				}
			}
		}
	}
	var keys []string
	for k := range tags {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		t.Logf("tag %s: %d of %d passed", k, tags[k].pass, tags[k].total)
	}
	if n < 100 {
		t.Fatalf("only %d tests found in %s", n, dir)
	}
	for _, f := range failed {
		t.Errorf("shareable test failed: %s", f)
	}
}
