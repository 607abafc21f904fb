package view

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"strings"
)

// Writer writes the rows of a view in one output format.
type Writer interface {
	Write(row []any) error
	// Close ends the output (a JSON array's closing bracket, buffered CSV).
	Close() error
}

// Formats maps the accepted _format values to a format name.
var Formats = map[string]string{
	"csv": "csv", "text/csv": "csv",
	"ndjson": "ndjson", "application/x-ndjson": "ndjson", "application/ndjson": "ndjson", "application/fhir+ndjson": "ndjson",
	"json": "json", "application/json": "json",
	"parquet": "parquet", "application/vnd.apache.parquet": "parquet",
}

// ContentType is the media type of each format.
var ContentType = map[string]string{"csv": "text/csv", "ndjson": "application/x-ndjson", "json": "application/json", "parquet": "application/vnd.apache.parquet"}

// NewWriter returns a Writer of format (a value of Formats) for the columns
// cols. header asks for CSV's header line.
func NewWriter(format string, w io.Writer, cols []Column, header bool) (Writer, error) {
	switch format {
	case "csv":
		cw := &csvWriter{w: csv.NewWriter(w), n: len(cols)}
		if header {
			names := make([]string, len(cols))
			for i, c := range cols {
				names[i] = c.Name
			}
			if err := cw.w.Write(names); err != nil {
				return nil, err
			}
		}
		return cw, nil
	case "ndjson", "json":
		keys := make([][]byte, len(cols))
		for i, c := range cols {
			keys[i], _ = json.Marshal(c.Name)
		}
		return &jsonWriter{w: w, keys: keys, array: format == "json"}, nil
	case "parquet":
		return newParquetWriter(w, cols)
	}
	return nil, fmt.Errorf("view: unknown output format %q", format)
}

type csvWriter struct {
	w   *csv.Writer
	n   int
	rec []string
}

// Write puts a row as CSV: null is an empty field, booleans true/false,
// numbers as given, collections and complex values as JSON.
func (c *csvWriter) Write(row []any) error {
	c.rec = c.rec[:0]
	for _, v := range row {
		switch x := v.(type) {
		case nil:
			c.rec = append(c.rec, "")
		case string:
			c.rec = append(c.rec, x)
		case bool, json.Number:
			c.rec = append(c.rec, fmt.Sprint(x))
		default:
			b, err := marshal(x)
			if err != nil {
				return err
			}
			c.rec = append(c.rec, string(b))
		}
	}
	if err := c.w.Write(c.rec); err != nil {
		return err
	}
	return c.w.Error()
}

func (c *csvWriter) Close() error {
	c.w.Flush()
	return c.w.Error()
}

type jsonWriter struct {
	w     io.Writer
	keys  [][]byte
	array bool
	n     int
	buf   bytes.Buffer
}

// Write puts a row as a JSON object with the columns in view order.
func (j *jsonWriter) Write(row []any) error {
	j.buf.Reset()
	switch {
	case j.array && j.n == 0:
		j.buf.WriteByte('[')
	case j.array:
		j.buf.WriteByte(',')
	}
	j.buf.WriteByte('{')
	for i, v := range row {
		if i > 0 {
			j.buf.WriteByte(',')
		}
		j.buf.Write(j.keys[i])
		j.buf.WriteByte(':')
		b, err := marshal(v)
		if err != nil {
			return err
		}
		j.buf.Write(b)
	}
	j.buf.WriteByte('}')
	if !j.array {
		j.buf.WriteByte('\n')
	}
	j.n++
	_, err := j.w.Write(j.buf.Bytes())
	return err
}

func (j *jsonWriter) Close() error {
	if !j.array {
		return nil
	}
	end := "]"
	if j.n == 0 {
		end = "[]"
	}
	_, err := io.WriteString(j.w, end)
	return err
}

// marshal encodes a value without HTML escaping (URLs keep their &).
func marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return []byte(strings.TrimSuffix(b.String(), "\n")), nil
}
