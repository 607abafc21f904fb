package export

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/fhirparquet"
	"github.com/kiln-fhir/kiln/view"
)

// execute runs one unit and returns the parts it wrote.
func (s *Service) execute(ctx context.Context, job *kiln.Job, u *kiln.Unit, sink kiln.Sink) ([]kiln.Part, error) {
	req := &job.Request
	set := s.settings(job)
	w := &partWriter{ctx: ctx, sink: sink, job: job.ID, prefix: unitPrefix(u), opt: kiln.WriteOptions{PartSize: req.UploadPartSize},
		maxCount: set.MaxFileResources, maxBytes: set.MaxFileBytes, open: map[string]*openPart{},
		parquet: req.OutputFormat == kiln.FormatParquet}
	refs := s.refs(job)
	q := baseQuery(job)
	// scanTo streams what the export keeps of one scan to emit.
	scanTo := func(q kiln.ScanQuery, emit func([]byte) error) error {
		sub := newSubsetter(q.Type, req.Elements)
		direct := q.Supporting && !asksCompartment(req)
		return s.selection(ctx, req, q, func(body []byte) error {
			if direct {
				if ok, err := referencesPatient(q.Type, body, refs); err != nil || !ok {
					return err
				}
			}
			if sub != nil {
				b, err := sub.apply(body)
				if err != nil {
					return err
				}
				body = b
			}
			return emit(body)
		})
	}
	var views []jobView
	if len(req.Views) > 0 {
		var err error
		if views, err = compileViews(req.Views); err != nil {
			return nil, err
		}
	}
	scan := func(q kiln.ScanQuery) error {
		if views != nil {
			return scanTo(q, func(body []byte) error { return w.viewRows(views, req, q.Type, body) })
		}
		return scanTo(q, func(body []byte) error { return w.write("output", q.Type, body) })
	}
	var err error
	switch u.Kind {
	case kiln.UnitType:
		q.Type, q.From, q.To = u.Type, u.From, u.To
		err = scan(q)
	case kiln.UnitPatients:
		q.Job, q.PatientLo, q.PatientHi = job.ID, u.PatientLo, u.PatientHi
		if req.OrganizeOutputBy != "" {
			err = s.blocks(ctx, job.ID, u, q, w, scanTo)
			break
		}
		for _, t := range u.Types {
			q.Type = t
			if err = scan(q); err != nil {
				break
			}
			// A Parquet file holds its row group in memory: one type's at a time.
			if err = w.closeParquet(t); err != nil {
				break
			}
		}
	case kiln.UnitSupporting:
		q.Job, q.Type, q.Supporting = job.ID, u.Type, true
		err = scan(q)
	case kiln.UnitDeleted:
		until := job.TransactionTime
		if req.Until != nil && req.Until.Before(until) {
			until = *req.Until
		}
		scope := ""
		if req.Level != kiln.LevelSystem && !(req.Level == kiln.LevelPatient && len(req.Patients) == 0) {
			scope = job.ID
		}
		err = s.store.Deletions(ctx, u.Types, *req.Since, until, scope, q.AccessCodes, func(d kiln.Deleted) error {
			if req.ScopeFilters[d.Type] != nil {
				return nil // the token sees only some of the type: a tombstone cannot show which
			}
			return w.write("deleted", "Bundle", deletedBundle(d))
		})
	case kiln.UnitAssociated:
		err = s.associated(ctx, job, u, w)
	case kiln.UnitErrors:
		for _, is := range req.Warnings {
			if err = w.write("error", "OperationOutcome", outcomeLine(is)); err != nil {
				break
			}
		}
	default:
		err = fmt.Errorf("unknown unit kind %q", u.Kind)
	}
	if err != nil {
		w.abort()
		return nil, err
	}
	return w.close()
}

// blocks writes organizeOutputBy=Patient output: per patient of the unit, a
// Parameters header naming it, then its compartment (the patient first),
// each resource in the block of its lowest-ordinal patient only. A patient
// with nothing in the export has no block.
func (s *Service) blocks(ctx context.Context, job string, u *kiln.Unit, q kiln.ScanQuery, w *partWriter, scanTo func(kiln.ScanQuery, func([]byte) error) error) error {
	ids, err := s.store.JobPatients(ctx, job, u.PatientLo, u.PatientHi)
	if err != nil {
		return err
	}
	for i, id := range ids {
		w.beginBlock(blockHeader(id))
		q.PatientLo, q.PatientHi = u.PatientLo+i, u.PatientLo+i
		for _, t := range u.Types {
			q.Type = t
			if err := scanTo(q, w.blockLine); err != nil {
				return err
			}
		}
		if err := w.endBlock(); err != nil {
			return err
		}
	}
	return nil
}

// blockHeader is the Parameters resource that opens a patient's block.
func blockHeader(patient string) []byte {
	b := []byte(`{"resourceType":"Parameters","parameter":[{"name":"header","valueReference":{"reference":`)
	b = fhir.AppendString(b, "Patient/"+patient)
	return append(b, `}}]}`...)
}

// asksCompartment reports whether the export asks for a type of the Patient
// compartment. When it does not (_type=Device, say, on a Patient-level
// export), the types outside it have no exported data to support: only their
// resources that reference the patients themselves are the patients' data,
// not those the patients' other resources happen to reference.
func asksCompartment(req *kiln.ExportRequest) bool {
	if !req.TypesAsked() {
		return true
	}
	return slices.ContainsFunc(req.Types, fhir.R4().InCompartment)
}

// referencesPatient reports whether a stored resource outside the
// compartment references a patient (Device.patient, say).
func referencesPatient(typ string, body []byte, opt fhir.Options) (bool, error) {
	m, err := fhir.DecodeJSON(body)
	if err != nil {
		return false, fmt.Errorf("decode stored resource: %w", err)
	}
	id, _ := m["id"].(string)
	return len(fhir.Extract(typ, id, m, opt).PatientRefs) > 0, nil
}

// baseQuery is the part of every scan of job that the job fixes: its
// snapshot, batch size, tenants and _since/_until window.
func baseQuery(job *kiln.Job) kiln.ScanQuery {
	req := &job.Request
	q := kiln.ScanQuery{Snapshot: job.TransactionTime, Batch: req.FetchResourceBatchSize}
	if req.Tenants != nil {
		q.AccessCodes = append([]string{}, req.Tenants...)
	}
	if req.Since != nil {
		q.Since = *req.Since
	}
	if req.Until != nil {
		q.Until = *req.Until
	}
	return q
}

// selection streams the resources one scan of the job exports: the store's
// rows as of the snapshot, for the job's tenants, kept by the type's
// _typeFilter and the token's scope filters. Units that write resources read
// through it, and so does the Provenance pass, to learn what was exported.
func (s *Service) selection(ctx context.Context, req *kiln.ExportRequest, q kiln.ScanQuery, fn func(body []byte) error) error {
	filters, err := compileFilters(q.Type, req.TypeFilters[q.Type])
	if err != nil {
		return err
	}
	scoped, err := compileFilters(q.Type, req.ScopeFilters[q.Type])
	if err != nil {
		return err
	}
	defer func(start time.Time) { s.cfg.Metrics.Store("scan", time.Since(start)) }(time.Now())
	return s.store.Scan(ctx, q, func(body []byte) error {
		// Only filtered types are decoded (once); the rest stream as stored bytes.
		if filters != nil || scoped != nil {
			m, err := fhir.DecodeJSON(body)
			if err != nil {
				return fmt.Errorf("decode stored resource: %w", err)
			}
			if filters != nil && !fhir.MatchAny(filters, m) || scoped != nil && !fhir.MatchAny(scoped, m) {
				return nil
			}
		}
		return fn(body)
	})
}

func compileFilters(typ string, queries []string) ([]*fhir.Query, error) {
	var out []*fhir.Query
	for _, q := range queries {
		f, err := fhir.ParseTypeFilter(typ + "?" + q)
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	return out, nil
}

func deletedBundle(d kiln.Deleted) []byte {
	b := []byte(`{"resourceType":"Bundle","type":"transaction","meta":{"lastUpdated":`)
	b = fhir.AppendString(b, fhir.FormatInstant(d.LastUpdated))
	b = append(b, `},"entry":[{"request":{"method":"DELETE","url":`...)
	b = fhir.AppendString(b, d.Type+"/"+d.ID)
	return append(b, `}}]}`...)
}

func outcomeLine(is kiln.Issue) []byte {
	b := []byte(`{"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"processing","diagnostics":`)
	b = fhir.AppendString(b, is.Message)
	if is.Expression != "" {
		b = append(b, `,"expression":[`...)
		b = fhir.AppendString(b, is.Expression)
		b = append(b, ']')
	}
	return append(b, `}]}`...)
}

type openPart struct {
	part kiln.Part
	w    io.WriteCloser
	// rows, for a view's part, formats its rows into w through counted;
	// resources, for a Parquet export's, its resources.
	rows      view.Writer
	resources *fhirparquet.Writer
	counted   *countingWriter
}

// finish ends the part's file: a view's writer flushes (a Parquet footer,
// a JSON array's end) first, and then the part knows its size.
func (p *openPart) finish() error {
	var err error
	switch {
	case p.rows != nil:
		err = p.rows.Close()
	case p.resources != nil:
		err = p.resources.Close()
	}
	if err != nil {
		p.w.Close()
		return err
	}
	if p.counted != nil {
		p.part.Bytes = p.counted.n
	}
	return p.w.Close()
}

// partWriter writes a unit's lines into parts, one open part per kind and
// type, starting a new part when one reaches the file limits.
type partWriter struct {
	ctx      context.Context
	sink     kiln.Sink
	job      string
	prefix   string
	maxCount int64
	maxBytes int64
	opt      kiln.WriteOptions
	open     map[string]*openPart
	done     []kiln.Part
	n        int
	blk      *block // the resource block being written (organizeOutputBy)
	// blockBuffer bounds a held block (maxBlockBuffer when 0; tests lower it).
	blockBuffer int64
	// parquet: output resources go into Parquet files, one type a file.
	parquet bool
}

var newline = []byte{'\n'}

func (w *partWriter) write(kind, typ string, line []byte) error {
	if kind == "output" && w.parquet {
		return w.writeParquet(typ, line)
	}
	key := kind + "/" + typ
	if p := w.open[key]; p != nil && w.full(p, line) {
		if err := w.roll(key); err != nil {
			return err
		}
	}
	return w.put(kind, typ, line)
}

// full reports whether line would take p past the file limits.
func (w *partWriter) full(p *openPart, line []byte) bool {
	return p.part.Count >= w.maxCount || p.part.Bytes+int64(len(line))+1 > w.maxBytes && p.part.Count > 0
}

// roll closes the open part of key; the next line starts a new one.
func (w *partWriter) roll(key string) error {
	p := w.open[key]
	if err := p.finish(); err != nil {
		return fmt.Errorf("write export part %s: %w", p.part.Name, err)
	}
	w.done = append(w.done, p.part)
	delete(w.open, key)
	return nil
}

// put appends line to the open part of kind and type, opening one if needed.
func (w *partWriter) put(kind, typ string, line []byte) error {
	key := kind + "/" + typ
	p := w.open[key]
	if p == nil {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		w.n++
		name := fmt.Sprintf("%s%s-%s-%03d.ndjson", w.prefix, kind, typ, w.n)
		f, err := w.sink.Create(w.ctx, w.job, name, w.opt)
		if err != nil {
			return err
		}
		p = &openPart{part: kiln.Part{Type: typ, Name: name, Kind: kind}, w: f}
		w.open[key] = p
	}
	if _, err := p.w.Write(line); err != nil {
		return fmt.Errorf("write export part %s: %w", p.part.Name, err)
	}
	if _, err := p.w.Write(newline); err != nil {
		return fmt.Errorf("write export part %s: %w", p.part.Name, err)
	}
	p.part.Count++
	p.part.Bytes += int64(len(line)) + 1
	// Cancellation is checked every so often, not per line.
	if p.part.Count%1024 == 0 {
		return w.ctx.Err()
	}
	return nil
}

// maxBlockBuffer bounds the memory a unit holds for one resource block
// while it decides whether the block fits in the current file.
const maxBlockBuffer = 32 << 20

// blockKey is the part key of organized output: every type in one stream.
const blockKey = "output/"

// block is a resource block being written (organizeOutputBy).
type block struct {
	header []byte
	lines  [][]byte
	size   int64 // bytes of header and lines, newlines included
	// flushed: the block went out (it outgrew the buffer); lines now stream.
	flushed bool
}

func (w *partWriter) beginBlock(header []byte) {
	w.blk = &block{header: header, size: int64(len(header)) + 1}
}

// blockLine adds a resource to the open block. Blocks are held until they
// end, so that one that fits in a file is never split across two; one that
// outgrows the buffer is written as it comes.
func (w *partWriter) blockLine(line []byte) error {
	b := w.blk
	if b.flushed {
		return w.blockPut(line)
	}
	b.lines = append(b.lines, bytes.Clone(line))
	b.size += int64(len(line)) + 1
	limit := w.blockBuffer
	if limit <= 0 {
		limit = maxBlockBuffer
	}
	if b.size > min(w.maxBytes, limit) {
		return w.flushBlock(true)
	}
	return nil
}

// endBlock writes the block, unless it holds no resource.
func (w *partWriter) endBlock() error {
	defer func() { w.blk = nil }()
	if b := w.blk; !b.flushed && len(b.lines) > 0 {
		return w.flushBlock(false)
	}
	return nil
}

// flushBlock writes the buffered block, in a new file when the current one
// cannot hold it whole. Early (the block outgrew the buffer before its end)
// its size is not known yet, so it always starts a file of its own: then it
// is split only if it is larger than a whole file.
func (w *partWriter) flushBlock(early bool) error {
	b := w.blk
	if p := w.open[blockKey]; p != nil && p.part.Count > 0 && (early || p.part.Count+int64(len(b.lines))+1 > w.maxCount || p.part.Bytes+b.size > w.maxBytes) {
		if err := w.roll(blockKey); err != nil {
			return err
		}
	}
	if err := w.put("output", "", b.header); err != nil {
		return err
	}
	b.flushed = true
	for _, l := range b.lines {
		if err := w.blockPut(l); err != nil {
			return err
		}
	}
	b.lines = nil
	return nil
}

// blockPut writes a line of a block that is going out; when the file is
// full the block continues in the next one, which repeats the header (the
// IG's rule for a split block).
func (w *partWriter) blockPut(line []byte) error {
	if p := w.open[blockKey]; p != nil && w.full(p, line) {
		p.part.Continues = true
		if err := w.roll(blockKey); err != nil {
			return err
		}
		if err := w.put("output", "", w.blk.header); err != nil {
			return err
		}
	}
	return w.put("output", "", line)
}

func (w *partWriter) close() ([]kiln.Part, error) {
	var firstErr error
	for _, p := range w.open {
		if err := p.finish(); err != nil && firstErr == nil {
			firstErr = fmt.Errorf("write export part %s: %w", p.part.Name, err)
		}
		w.done = append(w.done, p.part)
	}
	w.open = nil
	return w.done, firstErr
}

// abort drops the unit's open parts; a sink that uploads in parts aborts the upload.
func (w *partWriter) abort() {
	for _, p := range w.open {
		if a, ok := p.w.(interface{ Abort() error }); ok {
			a.Abort()
			continue
		}
		p.w.Close()
	}
	w.open = nil
}
