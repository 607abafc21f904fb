package view

import (
	"bytes"
	"encoding/json"
	"testing"
)

// TestWriters: each format's encoding of null, booleans, numbers as given,
// collections and complex values.
func TestWriters(t *testing.T) {
	cols := []Column{{Name: "s"}, {Name: "n"}, {Name: "b"}, {Name: "c", Collection: true}, {Name: "m"}}
	rows := [][]any{
		{"a,\"b\"", json.Number("1.50"), true, []any{"x", "y&z"}, map[string]any{"k": "v"}},
		{nil, nil, false, []any{}, nil},
	}
	for _, tc := range []struct {
		format string
		header bool
		want   string
	}{
		{"csv", true, "s,n,b,c,m\n\"a,\"\"b\"\"\",1.50,true,\"[\"\"x\"\",\"\"y&z\"\"]\",\"{\"\"k\"\":\"\"v\"\"}\"\n,,false,[],\n"},
		{"csv", false, ",,false,[],\n"},
		{"ndjson", false, `{"s":"a,\"b\"","n":1.50,"b":true,"c":["x","y&z"],"m":{"k":"v"}}` + "\n" + `{"s":null,"n":null,"b":false,"c":[],"m":null}` + "\n"},
		{"json", false, `[{"s":"a,\"b\"","n":1.50,"b":true,"c":["x","y&z"],"m":{"k":"v"}},{"s":null,"n":null,"b":false,"c":[],"m":null}]`},
	} {
		var buf bytes.Buffer
		w, err := NewWriter(tc.format, &buf, cols, tc.header)
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range rows {
			if tc.format == "csv" && !tc.header && i == 0 {
				continue
			}
			if err := w.Write(r); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		if buf.String() != tc.want {
			t.Errorf("%s header=%v:\n%s\nwant\n%s", tc.format, tc.header, buf.String(), tc.want)
		}
	}
	var buf bytes.Buffer
	w, _ := NewWriter("json", &buf, cols, false)
	w.Close()
	if buf.String() != "[]" {
		t.Errorf("empty json: %q", buf.String())
	}
}
