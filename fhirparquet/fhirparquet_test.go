package fhirparquet

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/parquet-go/parquet-go"
)

// TestSchema: the encoding the package comment describes, as seen in the
// schema of a Patient file.
func TestSchema(t *testing.T) {
	w, err := NewWriter(&bytes.Buffer{}, "Patient")
	if err != nil {
		t.Fatal(err)
	}
	leaves := map[string]parquet.Type{}
	for _, path := range w.w.Schema().Columns() {
		leaf, _ := w.w.Schema().Lookup(path...)
		leaves[strings.Join(path, ".")] = leaf.Node.Type()
	}
	for path, kind := range map[string]parquet.Kind{
		"id":                                   parquet.ByteArray,
		"active":                               parquet.Boolean,
		"birthDate":                            parquet.ByteArray, // partial dates stay text
		"multipleBirthInteger":                 parquet.Double,    // a choice: integer or decimal
		"name.list.element.given.list.element": parquet.ByteArray, // repeated in repeated
		"extension.list.element":               parquet.ByteArray, // JSON text
		"contained.list.element":               parquet.ByteArray, // JSON text
		// A Reference inside an Identifier inside a Reference: JSON text.
		"managingOrganization.identifier.assigner":     parquet.ByteArray,
		"managingOrganization.identifier.period.start": parquet.ByteArray,
		"communication.list.element.language.text":     parquet.ByteArray,
		"photo.list.element.size":                      parquet.Int64, // unsignedInt
		"contact.list.element.name.period.start":       parquet.ByteArray,
		"link.list.element.other.identifier.type.text": parquet.ByteArray,
		"identifier.list.element.assigner.identifier":  parquet.ByteArray, // below MaxDepth or enclosing: JSON
	} {
		got, ok := leaves[path]
		if !ok {
			t.Errorf("no column %s", path)
			continue
		}
		if got.Kind() != kind {
			t.Errorf("%s: %v, want %v", path, got.Kind(), kind)
		}
	}
	for path := range leaves {
		if strings.Contains(path, "_") && !strings.HasPrefix(path, "_") && strings.Contains("."+path, "._") {
			t.Errorf("a primitive's _element twin is encoded: %s", path)
		}
	}
	if _, err := NewWriter(&bytes.Buffer{}, "Frobnitz"); err == nil {
		t.Error("a writer for a type R4 does not have")
	}
}

// TestRowGroupsBoundedByBytes: the writer flushes a row group once it holds
// rowGroupBytes of input, so a file's memory does not grow with its rows.
func TestRowGroupsBoundedByBytes(t *testing.T) {
	var out bytes.Buffer
	w, err := NewWriter(&out, "Observation")
	if err != nil {
		t.Fatal(err)
	}
	in := 0
	for i := 0; in <= rowGroupBytes; i++ {
		b := []byte(fmt.Sprintf(`{"resourceType":"Observation","id":"o%d","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}],"text":%q},"valueQuantity":{"value":%d.5}}`, i, strings.Repeat("x", 500), i))
		if _, err := w.Write(b); err != nil {
			t.Fatal(err)
		}
		in += len(b)
	}
	if out.Len() == 0 {
		t.Fatalf("%d bytes of resources written and no row group flushed", in)
	}
	if _, err := w.Write([]byte(`{"resourceType":"Observation","id":"last","status":"final","code":{"text":"x"}}`)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := parquet.OpenFile(bytes.NewReader(out.Bytes()), int64(out.Len()))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(f.RowGroups()); n < 2 {
		t.Errorf("%d row groups", n)
	}
}

// TestValuesOfTheWrongShape: a value that does not fit its column (stored
// data that bypassed validation) is written as null and named, with the
// resource, for the caller to report — never a failed file or a panic; a
// null item of a repeated primitive is left out and is no loss.
func TestValuesOfTheWrongShape(t *testing.T) {
	var out bytes.Buffer
	w, err := NewWriter(&out, "Patient")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ body, lost string }{
		{`{"resourceType":"Patient","id":"p","active":"yes"}`, `Patient/p: active: "yes" is not a boolean`},
		{`{"resourceType":"Patient","id":"p","name":[{"given":[1]}]}`, `Patient/p: name[0].given[0]: 1 is not text`},
		{`{"resourceType":"Patient","id":"p","photo":[{"size":1.5}]}`, `Patient/p: photo[0].size: 1.5 does not fit INT64`},
		{`{"resourceType":"Patient","id":"p","photo":[{"size":99999999999999999999}]}`, `Patient/p: photo[0].size: 99999999999999999999 does not fit INT64`},
		{`{"resourceType":"Patient","id":"p","multipleBirthInteger":1e400}`, `Patient/p: multipleBirthInteger: 1e400 does not fit DOUBLE`},
		{`{"resourceType":"Patient","id":"p","maritalStatus":"M"}`, `Patient/p: maritalStatus: "M" is not an object`},
		{`{"resourceType":"Patient","id":"p","name":[{"given":[null,"Bob"]}],"_name":[{"given":[{"id":"g"},null]}]}`, ``},
		{`{"resourceType":"Patient","id":"p","birthdate":"1970","name":[{"famly":"X"}]}`, `Patient/p: birthdate: "1970" is not an element of R4 here: no column|Patient/p: name[0].famly: "X" is not an element of R4 here: no column`},
		{`{"resourceType":"Patient","id":"p","name":[{"given":[1,2,3,4,5,6,7,8,9,10,11,12]}]}`, `Patient/p: name[0].given[0]: 1 is not text|Patient/p: name[0].given[1]: 2 is not text|Patient/p: name[0].given[2]: 3 is not text|Patient/p: name[0].given[3]: 4 is not text|Patient/p: name[0].given[4]: 5 is not text|Patient/p: name[0].given[5]: 6 is not text|Patient/p: name[0].given[6]: 7 is not text|Patient/p: name[0].given[7]: 8 is not text|Patient/p: name[0].given[8]: 9 is not text|Patient/p: name[0].given[9]: 10 is not text|Patient/p: and 2 more values`},
	} {
		lost, err := w.Write([]byte(tc.body))
		if tc.lost != "" && !strings.Contains(tc.lost, "more values") {
			slices.Sort(lost) // elements of one object come sorted, nested ones first
		}
		if err != nil || strings.Join(lost, "|") != tc.lost {
			t.Errorf("%s: lost %q, %v; want %q", tc.body, lost, err, tc.lost)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	n, err := ReadKeys(bytes.NewReader(out.Bytes()), int64(out.Len()), func(string, string) error { return nil })
	if err != nil || n != 9 {
		t.Errorf("read back %d rows: %v", n, err)
	}
}

// BenchmarkWrite is the Parquet encoding's cost per resource.
func BenchmarkWrite(b *testing.B) {
	body := []byte(`{"resourceType":"Observation","id":"o1","meta":{"lastUpdated":"2024-01-01T00:00:00Z"},"status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}],"text":"Heart rate"},"subject":{"reference":"Patient/p1"},"encounter":{"reference":"Encounter/e1"},"effectiveDateTime":"2024-01-01T00:00:00Z","issued":"2024-01-01T00:00:00.000Z","valueQuantity":{"value":72,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}`)
	w, err := NewWriter(&bytes.Buffer{}, "Observation")
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		if _, err := w.Write(body); err != nil {
			b.Fatal(err)
		}
	}
	w.Close()
}

// TestReadKeys: a file written here reads back row by row; a cut file is an error.
func TestReadKeys(t *testing.T) {
	var out bytes.Buffer
	w, err := NewWriter(&out, "Patient")
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for i := range 1000 {
		id := fmt.Sprintf("p%d", i)
		want = append(want, "Patient/"+id)
		if _, err := w.Write([]byte(`{"resourceType":"Patient","id":"` + id + `","gender":"female"}`)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	var got []string
	n, err := ReadKeys(bytes.NewReader(out.Bytes()), int64(out.Len()), func(typ, id string) error {
		got = append(got, typ+"/"+id)
		return nil
	})
	if err != nil || n != 1000 || strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("read back %d rows, %v: %.80v", n, err, got)
	}
	cut := out.Bytes()[:out.Len()-10]
	if _, err := ReadKeys(bytes.NewReader(cut), int64(len(cut)), func(string, string) error { return nil }); err == nil {
		t.Error("a cut file read back without an error")
	}
}
