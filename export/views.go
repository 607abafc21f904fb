package export

import (
	"errors"
	"fmt"
	"io"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/fhirparquet"
	"github.com/kiln-fhir/kiln/view"
)

// jobView is a view of a $viewdefinition-export, compiled for one unit.
type jobView struct {
	name string
	v    *view.View
}

// compileViews compiles a job's views (checked at kick-off; a failure here
// means the stored job is damaged).
func compileViews(vs []kiln.ViewExport) ([]jobView, error) {
	out := make([]jobView, 0, len(vs))
	for _, x := range vs {
		v, err := view.Parse(x.Definition)
		if err != nil {
			return nil, fmt.Errorf("view %s: %w", x.Name, err)
		}
		out = append(out, jobView{name: x.Name, v: v})
	}
	return out, nil
}

// viewRows writes, for one stored resource of typ, the rows of every view
// over typ. A row the view cannot make (several values in a column that is
// not a collection, say) fails the unit, naming the resource.
func (w *partWriter) viewRows(views []jobView, req *kiln.ExportRequest, typ string, body []byte) error {
	var m map[string]any
	for _, jv := range views {
		if jv.v.Resource != typ {
			continue
		}
		if m == nil {
			var err error
			if m, err = fhir.DecodeJSON(body); err != nil {
				return fmt.Errorf("decode stored resource: %w", err)
			}
		}
		rows, err := jv.v.Rows(m)
		if err != nil {
			var e *kiln.Error
			if errors.As(err, &e) {
				id, _ := m["id"].(string)
				e.Message = fmt.Sprintf("view %s, %s/%s: %s", jv.name, typ, id, e.Message)
			}
			return err
		}
		for _, row := range rows {
			if err := w.writeRow(jv, req.ViewFormat, req.ViewHeader, row); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeRow adds a row to the open part of the view, starting a part (a file
// of its own in the manifest: CSV headers, JSON arrays and Parquet footers
// cannot be joined) when there is none or it reached the file limits.
func (w *partWriter) writeRow(jv jobView, format string, header bool, row []any) error {
	key := "output/" + jv.name
	if p := w.open[key]; p != nil && (p.part.Count >= w.maxCount || p.counted.n >= w.maxBytes) {
		if err := w.roll(key); err != nil {
			return err
		}
	}
	p := w.open[key]
	if p == nil {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		w.n++
		name := fmt.Sprintf("%soutput-%s-%03d.%s", w.prefix, jv.name, w.n, format)
		f, err := w.sink.Create(w.ctx, w.job, name, w.opt)
		if err != nil {
			return err
		}
		cw := &countingWriter{w: f}
		rw, err := view.NewWriter(format, cw, jv.v.Columns, header)
		if err != nil {
			f.Close()
			return err
		}
		p = &openPart{part: kiln.Part{Type: jv.name, Name: name, Kind: "output"}, w: f, rows: rw, counted: cw}
		w.open[key] = p
	}
	if err := p.rows.Write(row); err != nil {
		return fmt.Errorf("view %s: %w", jv.name, err)
	}
	p.part.Count++
	if p.part.Count%1024 == 0 {
		return w.ctx.Err()
	}
	return nil
}

// writeParquet adds a resource to the open Parquet part of its type,
// starting one (a file of its own) when there is none or it reached the
// file limits.
func (w *partWriter) writeParquet(typ string, body []byte) error {
	key := "output/" + typ
	if p := w.open[key]; p != nil && (p.part.Count >= w.maxCount || p.counted.n >= w.maxBytes) {
		if err := w.roll(key); err != nil {
			return err
		}
	}
	p := w.open[key]
	if p == nil {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		w.n++
		name := fmt.Sprintf("%soutput-%s-%03d.parquet", w.prefix, typ, w.n)
		f, err := w.sink.Create(w.ctx, w.job, name, w.opt)
		if err != nil {
			return err
		}
		cw := &countingWriter{w: f}
		pw, err := fhirparquet.NewWriter(cw, typ)
		if err != nil {
			f.Close()
			return err
		}
		p = &openPart{part: kiln.Part{Type: typ, Name: name, Kind: "output"}, w: f, resources: pw, counted: cw}
		w.open[key] = p
	}
	lost, err := p.resources.Write(body)
	if err != nil {
		return err
	}
	// Values Parquet cannot hold are null in the file and said in the error file.
	for _, l := range lost {
		if err := w.write("error", "OperationOutcome", outcomeLine(kiln.Issue{Expression: "_outputFormat", Message: l + "; written as null in Parquet"})); err != nil {
			return err
		}
	}
	p.part.Count++
	if p.part.Count%1024 == 0 {
		return w.ctx.Err()
	}
	return nil
}

// closeParquet ends the open Parquet part of typ, if any.
func (w *partWriter) closeParquet(typ string) error {
	if !w.parquet || w.open["output/"+typ] == nil {
		return nil
	}
	return w.roll("output/" + typ)
}

// countingWriter counts the bytes a view's writer gives the sink.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}
