package view

import (
	"encoding/json"
	"fmt"
	"io"
	"reflect"
	"strconv"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/parquet-go/parquet-go"
	"github.com/parquet-go/parquet-go/compress/zstd"
)

// parquetRowGroup bounds a row group (parquet-go holds one in memory until
// it is flushed), so a large view's memory stays flat.
const parquetRowGroup = 50_000

// ParquetType is the Parquet type of a view column of FHIR type typ:
//
//	boolean                          BOOLEAN
//	integer, positiveInt, unsignedInt INT32
//	integer64                        INT64
//	decimal                          DOUBLE
//	instant                          TIMESTAMP(MILLIS, UTC)
//	anything else                    STRING (UTF8)
//
// date, dateTime and time stay text: FHIR allows partial values ("1970-06")
// that no Parquet date or timestamp can hold. Every column is optional (null
// when the path finds nothing); a collection column is a LIST of its
// element type. A complex value in a column (no type, or a complex type) is
// its JSON text.
func ParquetType(typ string) string {
	return parquetKinds[parquetKind(typ)]
}

var parquetKinds = map[reflect.Type]string{
	reflect.TypeFor[bool]():      "BOOLEAN",
	reflect.TypeFor[int32]():     "INT32",
	reflect.TypeFor[int64]():     "INT64",
	reflect.TypeFor[float64]():   "DOUBLE",
	reflect.TypeFor[time.Time](): "TIMESTAMP",
	reflect.TypeFor[string]():    "STRING",
}

func parquetKind(typ string) reflect.Type {
	switch typ {
	case "boolean":
		return reflect.TypeFor[bool]()
	case "integer", "positiveInt", "unsignedInt":
		return reflect.TypeFor[int32]()
	case "integer64":
		return reflect.TypeFor[int64]()
	case "decimal":
		return reflect.TypeFor[float64]()
	case "instant":
		return reflect.TypeFor[time.Time]()
	}
	return reflect.TypeFor[string]()
}

type parquetWriter struct {
	w    *parquet.Writer
	cols []Column
	typ  reflect.Type
}

// newParquetWriter writes rows as one Parquet file whose columns are the
// view's, in view order (a struct type built for the view gives the order).
func newParquetWriter(out io.Writer, cols []Column) (*parquetWriter, error) {
	fields := make([]reflect.StructField, len(cols))
	for i, c := range cols {
		k := parquetKind(c.Type)
		tag := c.Name
		if k == reflect.TypeFor[time.Time]() {
			tag += ",timestamp(millisecond)"
		}
		var t reflect.Type
		if c.Collection {
			t = reflect.SliceOf(k)
			tag += ",list"
		} else {
			t = reflect.PointerTo(k)
		}
		fields[i] = reflect.StructField{Name: "F" + strconv.Itoa(i), Type: t, Tag: reflect.StructTag(`parquet:"` + tag + `"`)}
	}
	typ := reflect.StructOf(fields)
	schema := parquet.SchemaOf(reflect.New(typ).Interface())
	w := parquet.NewWriter(out, schema, parquet.MaxRowsPerRowGroup(parquetRowGroup), parquet.Compression(&zstd.Codec{}))
	return &parquetWriter{w: w, cols: cols, typ: typ}, nil
}

func (p *parquetWriter) Write(row []any) error {
	v := reflect.New(p.typ)
	s := v.Elem()
	for i, val := range row {
		c := p.cols[i]
		k := parquetKind(c.Type)
		if c.Collection {
			items, _ := val.([]any)
			sl := reflect.MakeSlice(s.Field(i).Type(), 0, len(items))
			for _, it := range items {
				x, err := parquetValue(k, it)
				if err != nil {
					return kiln.Invalid(c.at+".type", "column %s: %v", c.Name, err)
				}
				if x.IsValid() {
					sl = reflect.Append(sl, x)
				}
			}
			s.Field(i).Set(sl)
			continue
		}
		x, err := parquetValue(k, val)
		if err != nil {
			return kiln.Invalid(c.at+".type", "column %s: %v", c.Name, err)
		}
		if x.IsValid() {
			ptr := reflect.New(k)
			ptr.Elem().Set(x)
			s.Field(i).Set(ptr)
		}
	}
	return p.w.Write(v.Interface())
}

// parquetValue converts a row value to the column's Go type; invalid for null.
func parquetValue(k reflect.Type, val any) (reflect.Value, error) {
	if val == nil {
		return reflect.Value{}, nil
	}
	switch k {
	case reflect.TypeFor[bool]():
		if b, ok := val.(bool); ok {
			return reflect.ValueOf(b), nil
		}
	case reflect.TypeFor[int32](), reflect.TypeFor[int64]():
		if n, ok := val.(json.Number); ok {
			i, err := strconv.ParseInt(string(n), 10, k.Bits())
			if err == nil {
				return reflect.ValueOf(i).Convert(k), nil
			}
		}
	case reflect.TypeFor[float64]():
		if n, ok := val.(json.Number); ok {
			if f, err := n.Float64(); err == nil {
				return reflect.ValueOf(f), nil
			}
		}
	case reflect.TypeFor[time.Time]():
		if s, ok := val.(string); ok {
			if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
				return reflect.ValueOf(t.UTC()), nil
			}
		}
	default:
		switch x := val.(type) {
		case string:
			return reflect.ValueOf(x), nil
		case bool, json.Number:
			return reflect.ValueOf(fmt.Sprint(x)), nil
		}
		b, err := marshal(val)
		return reflect.ValueOf(string(b)), err
	}
	return reflect.Value{}, fmt.Errorf("%v is not a value of Parquet type %s", val, parquetKinds[k])
}

func (p *parquetWriter) Close() error { return p.w.Close() }
