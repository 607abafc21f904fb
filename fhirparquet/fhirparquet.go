// Package fhirparquet is Kiln's Parquet encoding of FHIR R4 resources: one
// file per resource type whose schema is derived from the R4 definitions
// (package fhir), written with parquet-go.
//
// The encoding, element by element:
//
//   - a primitive is an optional leaf: boolean as BOOLEAN; integer,
//     positiveInt and unsignedInt as INT64; decimal as DOUBLE (a decimal
//     choice, value[x], too: R4's JSON Schema does not tell integer from
//     decimal there); every other primitive (string, code, uri, date,
//     dateTime, instant, time, base64Binary, xhtml, …) as UTF-8 text, since
//     FHIR dates may be partial ("1970-06");
//   - a complex element is an optional group of its own elements, in the
//     definition's order;
//   - a repeating element (max *) is a LIST of its element;
//   - a choice element is one field per type, as in JSON (valueQuantity,
//     valueString, …);
//   - extension, modifierExtension and contained are LISTs of each item's
//     JSON text (their shapes are open-ended), and so is an element whose
//     type already encloses it (Identifier.assigner within a Reference, say)
//     or that lies deeper than MaxDepth groups: JSON text, not lost;
//   - the _element twins of primitives (their id and extensions) are not
//     encoded.
package fhirparquet

import (
	"encoding/json"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strconv"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/parquet-go/parquet-go"
	"github.com/parquet-go/parquet-go/compress/zstd"
)

// MaxDepth is the deepest group nesting; elements below it are JSON text.
const MaxDepth = 4

// rowGroupBytes bounds the JSON held in one row group before it is flushed:
// parquet-go keeps a row group in memory until then.
const rowGroupBytes = 16 << 20

type kind int

const (
	kText kind = iota
	kBool
	kInt
	kFloat
	kJSON
	kGroup
)

// node is how one element's value goes into its Go field.
type node struct {
	kind   kind
	array  bool
	typ    reflect.Type // the field's type (pointer or slice)
	fields []field      // kGroup
	group  reflect.Type // kGroup: the struct
	names  map[string]bool
}

type field struct {
	name  string // the JSON name
	index int
	node  *node
}

var leaf = map[kind]reflect.Type{
	kText: reflect.TypeFor[string](), kBool: reflect.TypeFor[bool](), kInt: reflect.TypeFor[int64](),
	kFloat: reflect.TypeFor[float64](), kJSON: reflect.TypeFor[string](),
}

// primitive is the leaf kind of an R4 primitive, or false for a complex type.
func primitive(d *fhir.Definitions, t string) (kind, bool) {
	switch t {
	case "boolean":
		return kBool, true
	case "integer", "positiveInt", "unsignedInt":
		return kInt, true
	case "decimal", "number":
		return kFloat, true
	case "string", "xhtml":
		return kText, true
	}
	if _, ok := d.Primitives[t]; ok {
		return kText, true
	}
	return 0, false
}

// build makes the group node of type name.
func build(d *fhir.Definitions, name string, enclosing []string) (*node, error) {
	td := d.Types[name]
	if td == nil {
		return nil, kiln.Invalid("_outputFormat", "%s has no definition to derive a Parquet schema from", name)
	}
	n := &node{kind: kGroup, names: map[string]bool{}}
	var sf []reflect.StructField
	for _, p := range td.Props {
		if len(p.Name) > 0 && p.Name[0] == '_' {
			continue
		}
		var c *node
		if k, ok := primitive(d, p.Type); ok {
			c = &node{kind: k}
		} else if p.Type == "Extension" || p.Type == "ResourceList" || slices.Contains(enclosing, p.Type) || len(enclosing) >= MaxDepth {
			c = &node{kind: kJSON}
		} else {
			var err error
			if c, err = build(d, p.Type, append(slices.Clip(enclosing), name)); err != nil {
				return nil, err
			}
		}
		c.array = p.Array
		elem := leaf[c.kind]
		if c.kind == kGroup {
			elem = c.group
		}
		tag := p.Name
		if c.array {
			c.typ = reflect.SliceOf(elem)
			tag += ",list"
		} else {
			c.typ = reflect.PointerTo(elem)
			tag += ",optional"
		}
		n.fields = append(n.fields, field{name: p.Name, index: len(sf), node: c})
		n.names[p.Name] = true
		sf = append(sf, reflect.StructField{Name: "F" + strconv.Itoa(len(sf)), Type: c.typ, Tag: reflect.StructTag(`parquet:"` + tag + `"`)})
	}
	n.group = reflect.StructOf(sf)
	return n, nil
}

// Writer writes resources of one type as one Parquet file.
type Writer struct {
	typ     string
	root    *node
	schema  *parquet.Schema
	w       *parquet.Writer
	pending int
	// batch holds rows until writeBatch: parquet-go's cost per call is per
	// column, and a resource type has hundreds.
	batch []parquet.Row
	n     int // rows of batch in use; the rest keep their memory for reuse
}

// batchRows is how many rows go to parquet-go at once.
const batchRows = 64

// NewWriter starts a Parquet file of resources of type typ on out.
func NewWriter(out io.Writer, typ string) (*Writer, error) {
	d := fhir.R4()
	if !d.IsResourceType(typ) {
		return nil, kiln.Invalid("_type", "%q is not an R4 resource type", typ)
	}
	root, err := build(d, typ, nil)
	if err != nil {
		return nil, err
	}
	schema := parquet.SchemaOf(reflect.New(root.group).Interface())
	pw := parquet.NewWriter(out, schema, parquet.Compression(&zstd.Codec{}), parquet.PageBufferSize(32<<10))
	return &Writer{typ: typ, root: root, schema: schema, w: pw}, nil
}

// Columns is the number of leaf columns of the file's schema.
func (w *Writer) Columns() int { return len(w.w.Schema().Columns()) }

// Write adds one stored resource (its JSON). A value that does not fit its
// column — a number beyond INT64 or DOUBLE, text where the definition has a
// number or a group, as data that bypassed validation may have — is written
// as null and named in lost ("Patient/p: photo[0].size: …"), for the caller
// to report, as is an element R4 does not define there (no column holds it);
// neither fails the file. At most maxLost are named per resource, then a
// count. A null item of a repeated primitive (the placeholder of its
// _element twin) is left out.
func (w *Writer) Write(body []byte) (lost []string, err error) {
	m, err := fhir.DecodeJSON(body)
	if err != nil {
		return nil, fmt.Errorf("decode stored resource: %w", err)
	}
	v := reflect.New(w.root.group)
	id, _ := m["id"].(string)
	f := filler{key: w.typ + "/" + id}
	f.fill(w.root, v.Elem(), m, "")
	lost = f.lost
	if f.more > 0 {
		lost = append(lost, fmt.Sprintf("%s: and %d more values", f.key, f.more))
	}
	if w.n == len(w.batch) {
		w.batch = append(w.batch, nil)
	}
	w.batch[w.n] = w.schema.Deconstruct(w.batch[w.n][:0], v.Interface())
	if w.n++; w.n >= batchRows {
		if err := w.writeBatch(); err != nil {
			return lost, err
		}
	}
	if w.pending += len(body); w.pending >= rowGroupBytes {
		w.pending = 0
		if err := w.writeBatch(); err != nil {
			return lost, err
		}
		if err := w.w.Flush(); err != nil {
			return lost, fmt.Errorf("flush Parquet row group: %w", err)
		}
	}
	return lost, nil
}

func (w *Writer) writeBatch() error {
	if w.n == 0 {
		return nil
	}
	if _, err := w.w.WriteRows(w.batch[:w.n]); err != nil {
		return fmt.Errorf("write Parquet rows: %w", err)
	}
	w.n = 0
	return nil
}

// Close ends the file (its footer).
func (w *Writer) Close() error {
	if err := w.writeBatch(); err != nil {
		w.w.Close()
		return err
	}
	return w.w.Close()
}

// filler fills one resource's row, noting the values it had to leave null.
type filler struct {
	key  string
	lost []string
	more int // losses past maxLost, counted only
}

// maxLost bounds the losses named per resource.
const maxLost = 10

func (f *filler) lose(path string, x any, why string) {
	if len(f.lost) == maxLost {
		f.more++
		return
	}
	b, _ := json.Marshal(x)
	if len(b) > 40 {
		b = append(b[:40:40], "…"...)
	}
	f.lost = append(f.lost, fmt.Sprintf("%s: %s: %s %s", f.key, path, b, why))
}

// fill sets the fields of group value s from the JSON object m.
func (f *filler) fill(n *node, s reflect.Value, m map[string]any, at string) {
	for _, fd := range n.fields {
		x, ok := m[fd.name]
		if !ok || x == nil {
			continue
		}
		path := fd.name
		if at != "" {
			path = at + "." + fd.name
		}
		fv := s.Field(fd.index)
		if fd.node.array {
			items, ok := x.([]any)
			if !ok {
				items = []any{x}
			}
			sl := reflect.MakeSlice(fd.node.typ, 0, len(items))
			elem := reflect.New(fd.node.typ.Elem()).Elem()
			for i, it := range items {
				if it == nil {
					continue // a placeholder for the _element twin
				}
				elem.SetZero()
				if f.set(fd.node, elem, it, fmt.Sprintf("%s[%d]", path, i)) {
					sl = reflect.Append(sl, elem)
				}
			}
			fv.Set(sl)
			continue
		}
		p := reflect.New(fd.node.typ.Elem())
		if f.set(fd.node, p.Elem(), x, path) {
			fv.Set(p)
		}
	}
	// An element the definition does not have (data that bypassed
	// validation) has no column: said, not dropped unseen.
	var unknown []string
	for k := range m {
		if !n.names[k] && k != "" && k[0] != '_' {
			unknown = append(unknown, k)
		}
	}
	slices.Sort(unknown)
	for _, k := range unknown {
		path := k
		if at != "" {
			path = at + "." + k
		}
		f.lose(path, m[k], "is not an element of R4 here: no column")
	}
}

// set puts one JSON value into v (the element's Go value, not its
// pointer), or reports false, having noted why, when it cannot.
func (f *filler) set(n *node, v reflect.Value, x any, path string) bool {
	switch n.kind {
	case kGroup:
		m, ok := x.(map[string]any)
		if !ok {
			f.lose(path, x, "is not an object")
			return false
		}
		f.fill(n, v, m, path)
	case kJSON:
		b, err := json.Marshal(x)
		if err != nil {
			f.lose(path, x, "cannot be written as JSON")
			return false
		}
		v.SetString(string(b))
	case kText:
		s, ok := x.(string)
		if !ok {
			f.lose(path, x, "is not text")
			return false
		}
		v.SetString(s)
	case kBool:
		b, ok := x.(bool)
		if !ok {
			f.lose(path, x, "is not a boolean")
			return false
		}
		v.SetBool(b)
	case kInt, kFloat:
		num, ok := x.(json.Number)
		if !ok {
			f.lose(path, x, "is not a number")
			return false
		}
		if n.kind == kInt {
			i, err := num.Int64()
			if err != nil {
				f.lose(path, x, "does not fit INT64")
				return false
			}
			v.SetInt(i)
			return true
		}
		fl, err := num.Float64()
		if err != nil {
			f.lose(path, x, "does not fit DOUBLE")
			return false
		}
		v.SetFloat(fl)
	}
	return true
}

// key is the part of a resource ReadKeys reads.
type key struct {
	ResourceType *string `parquet:"resourceType,optional"`
	ID           *string `parquet:"id,optional"`
}

// ReadKeys reads a Parquet file of resources back: it calls fn with each
// row's resourceType and id, in order, and returns the number of rows. A
// file that is not Parquet, or is cut short, is an error.
func ReadKeys(f io.ReaderAt, size int64, fn func(resourceType, id string) error) (int64, error) {
	pf, err := parquet.OpenFile(f, size)
	if err != nil {
		return 0, fmt.Errorf("not a whole Parquet file: %w", err)
	}
	r := parquet.NewGenericReader[key](pf)
	defer r.Close()
	buf := make([]key, 512)
	var n int64
	for {
		k, err := r.Read(buf)
		for _, row := range buf[:k] {
			var typ, id string
			if row.ResourceType != nil {
				typ = *row.ResourceType
			}
			if row.ID != nil {
				id = *row.ID
			}
			if err := fn(typ, id); err != nil {
				return n, err
			}
			n++
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return n, fmt.Errorf("read Parquet rows: %w", err)
		}
	}
	if n != pf.NumRows() {
		return n, fmt.Errorf("read %d rows of the %d the file holds", n, pf.NumRows())
	}
	return n, nil
}
