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

// formattedPart returns the open output part of typ (a view's name or a
// resource type) whose content a format's writer makes, starting one — a
// file of its own in the manifest: CSV headers, JSON arrays and Parquet
// footers cannot be joined — when there is none or it reached the file
// limits. start makes the part's writer on the counted sink file.
func (w *partWriter) formattedPart(typ, ext string, start func(p *openPart) error) (*openPart, error) {
	key := "output/" + typ
	if p := w.open[key]; p != nil && (p.part.Count >= w.maxCount || p.counted.n >= w.maxBytes) {
		if err := w.roll(key); err != nil {
			return nil, err
		}
	}
	if p := w.open[key]; p != nil {
		return p, nil
	}
	if err := w.ctx.Err(); err != nil {
		return nil, err
	}
	w.n++
	name := fmt.Sprintf("%soutput-%s-%03d.%s", w.prefix, typ, w.n, ext)
	f, err := w.sink.Create(w.ctx, w.job, name, w.opt)
	if err != nil {
		return nil, err
	}
	p := &openPart{part: kiln.Part{Type: typ, Name: name, Kind: "output"}, w: f, counted: &countingWriter{w: f}}
	if err := start(p); err != nil {
		f.Close()
		return nil, err
	}
	w.open[key] = p
	return p, nil
}

// tally counts one row of p, checking for cancellation now and then.
func (w *partWriter) tally(p *openPart) error {
	p.part.Count++
	if p.part.Count%1024 == 0 {
		return w.ctx.Err()
	}
	return nil
}

// writeRow adds a row of a view to its open part.
func (w *partWriter) writeRow(jv jobView, format string, header bool, row []any) error {
	p, err := w.formattedPart(jv.name, format, func(p *openPart) (err error) {
		p.rows, err = view.NewWriter(format, p.counted, jv.v.Columns, header)
		return err
	})
	if err != nil {
		return err
	}
	if err := p.rows.Write(row); err != nil {
		return fmt.Errorf("view %s: %w", jv.name, err)
	}
	return w.tally(p)
}

// writeParquet adds a resource to the open Parquet part of its type.
func (w *partWriter) writeParquet(typ string, body []byte) error {
	p, err := w.formattedPart(typ, "parquet", func(p *openPart) (err error) {
		p.resources, err = fhirparquet.NewWriter(p.counted, typ)
		return err
	})
	if err != nil {
		return err
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
	return w.tally(p)
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
