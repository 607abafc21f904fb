package view

import (
	"errors"
	"testing"

	"github.com/kiln-fhir/kiln"
)

// TestCompileNamesBadElement: an invalid view is refused with an error that
// locates the bad element.
func TestCompileNamesBadElement(t *testing.T) {
	for _, tc := range []struct{ view, at string }{
		{`{}`, "ViewDefinition.resource"},
		{`{"resource":"Patient"}`, "ViewDefinition.select"},
		{`{"resource":"Patient","select":[{"forEach":1}]}`, "ViewDefinition.select[0].forEach"},
		{`{"resource":"Patient","select":[{"column":[{"name":"a","path":"name.("}]}]}`, "ViewDefinition.select[0].column[0].path"},
		{`{"resource":"Patient","select":[{"column":[{"name":"a b","path":"id"}]}]}`, "ViewDefinition.select[0].column[0].name"},
		{`{"resource":"Patient","select":[{"column":[{"name":"a","path":"id"}]},{"column":[{"name":"a","path":"id"}]}]}`, "ViewDefinition.select[1].column[0]"},
		{`{"resource":"Patient","select":[{"column":[{"name":"a","path":"%nope"}]}]}`, "ViewDefinition.select[0].column[0].path"},
		{`{"resource":"Patient","constant":[{"name":"x"}],"select":[{"column":[{"name":"a","path":"id"}]}]}`, "ViewDefinition.constant[0]"},
		{`{"resource":"Patient","where":[{"path":"frobnicate()"}],"select":[{"column":[{"name":"a","path":"id"}]}]}`, "ViewDefinition.where[0].path"},
		{`{"resource":"Patient","select":[{"unionAll":[{"column":[{"name":"a","path":"id"}]},{"column":[{"name":"b","path":"id"}]}]}]}`, "ViewDefinition.select[0].unionAll[1]"},
		{`{"resource":"Patient","select":[{"forEach":"name","repeat":["item"]}]}`, "ViewDefinition.select[0]"},
		{`{"resource":"Patient","select":[{"colum":[]}]}`, "ViewDefinition.select[0].colum"},
	} {
		_, err := Parse([]byte(tc.view))
		var e *kiln.Error
		if !errors.As(err, &e) || e.Code != kiln.EINVALID || len(e.Expression) != 1 || e.Expression[0] != tc.at {
			t.Errorf("%s: got %v, want an invalid error at %s", tc.view, err, tc.at)
		}
	}
}

// TestRowsErrorsNameColumn: a non-collection column that finds several
// values is an error naming the column.
func TestRowsErrorsNameColumn(t *testing.T) {
	v, err := Parse([]byte(`{"resource":"Patient","select":[{"column":[{"name":"id","path":"id"},{"name":"g","path":"name.given"}]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	rows, err := v.Rows(map[string]any{"resourceType": "Patient", "id": "a", "name": []any{map[string]any{"given": []any{"x"}}}})
	if err != nil || len(rows) != 1 || rows[0][1] != "x" {
		t.Fatalf("one given: %v %v", rows, err)
	}
	_, err = v.Rows(map[string]any{"resourceType": "Patient", "id": "a", "name": []any{map[string]any{"given": []any{"x", "y"}}}})
	var e *kiln.Error
	if !errors.As(err, &e) || e.Expression[0] != "ViewDefinition.select[0].column[1].path" {
		t.Fatalf("two givens: %v", err)
	}
	if rows, err := v.Rows(map[string]any{"resourceType": "Observation", "id": "o"}); err != nil || rows != nil {
		t.Fatalf("another type: %v %v", rows, err)
	}
}

// TestWhereMustBeOneBoolean: a where giving several values is refused, not
// judged by its first.
func TestWhereMustBeOneBoolean(t *testing.T) {
	v, err := Parse([]byte(`{"resource":"Patient","where":[{"path":"name.exists()"},{"path":"(name.family = 'x') | true"}],"select":[{"column":[{"name":"id","path":"id"}]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	_, err = v.Rows(map[string]any{"resourceType": "Patient", "id": "a", "name": []any{map[string]any{"family": "y"}}})
	var e *kiln.Error
	if !errors.As(err, &e) || e.Expression[0] != "ViewDefinition.where[1].path" {
		t.Fatalf("got %v", err)
	}
}

// TestRepeatThatDoesNotDescend: repeat on $this is an error, not endless recursion.
func TestRepeatThatDoesNotDescend(t *testing.T) {
	v, err := Parse([]byte(`{"resource":"Patient","select":[{"repeat":["$this"],"column":[{"name":"id","path":"id"}]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	_, err = v.Rows(map[string]any{"resourceType": "Patient", "id": "a"})
	var e *kiln.Error
	if !errors.As(err, &e) || e.Expression[0] != "ViewDefinition.select[0].repeat[0]" {
		t.Fatalf("got %v", err)
	}
}
