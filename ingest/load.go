package ingest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// LoadOptions tunes Load.
type LoadOptions struct {
	Ref fhir.Options
	// Batch is the number of resources written per store transaction.
	Batch int
	// Workers parse and validate in parallel; the store writes in order.
	Workers int
	// MaxLine is the longest NDJSON line accepted, in bytes.
	MaxLine int
	NewID   func() string
	// Progress, if set, is called after each batch is written.
	Progress func(Stats)
}

// Rejected is an input line or entry that was not loaded.
type Rejected struct {
	File   string
	Line   int
	Reason string
}

// Stats summarises a load.
type Stats struct {
	Files     int
	Read      int64 // lines or entries read
	Bytes     int64 // input bytes read (compressed size for .gz)
	Written   map[string]int64
	Unchanged int64
	Rejected  []Rejected
	// RejectedCount counts all rejections; Rejected keeps the first 1,000.
	RejectedCount int64
}

const maxRejectedKept = 1000

type item struct {
	file string
	line int
	body []byte
	// bundle is a whole Bundle file, loaded as its own transaction.
	bundle bool
}

type chunk struct {
	seq    int
	items  []item
	writes []kiln.Write
	rej    []Rejected
}

// Load reads every file under paths (NDJSON, NDJSON.gz, JSON Bundles or
// single resources, and folders of them) and writes the resources in batches.
// It streams: memory holds a few batches, never a whole file.
func Load(ctx context.Context, store kiln.ResourceStore, paths []string, opt LoadOptions) (Stats, error) {
	if opt.Batch <= 0 {
		opt.Batch = 1000
	}
	if opt.Workers <= 0 {
		opt.Workers = runtime.NumCPU()
	}
	if opt.MaxLine <= 0 {
		opt.MaxLine = 64 << 20
	}
	files, err := listFiles(paths)
	if err != nil {
		return Stats{}, err
	}
	st := Stats{Files: len(files), Written: map[string]int64{}}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	raw := make(chan chunk, opt.Workers*2)
	parsed := make(chan chunk, opt.Workers*2)
	var readErr error
	var bytesRead atomic.Int64
	go func() {
		defer close(raw)
		readErr = readFiles(ctx, files, opt, raw, &bytesRead)
	}()
	var wg sync.WaitGroup
	for range opt.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range raw {
				parseChunk(&c, opt)
				select {
				case parsed <- c:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	go func() { wg.Wait(); close(parsed) }()

	// Write chunks in read order, so a later line for the same id wins.
	pending := map[int]chunk{}
	next := 0
	var writeErr error
	for c := range parsed {
		if writeErr != nil {
			continue
		}
		pending[c.seq] = c
		for {
			c, ok := pending[next]
			if !ok {
				break
			}
			delete(pending, next)
			next++
			if err := writeChunk(ctx, store, &c, &st); err != nil {
				writeErr = err
				cancel()
				break
			}
			st.Bytes = bytesRead.Load()
			if opt.Progress != nil {
				opt.Progress(st)
			}
		}
	}
	st.Bytes = bytesRead.Load()
	if writeErr != nil {
		return st, writeErr
	}
	if readErr != nil && !errors.Is(readErr, context.Canceled) {
		return st, readErr
	}
	return st, ctx.Err()
}

func writeChunk(ctx context.Context, store kiln.ResourceStore, c *chunk, st *Stats) error {
	st.Read += int64(len(c.items))
	for _, r := range c.rej {
		st.RejectedCount++
		if len(st.Rejected) < maxRejectedKept {
			st.Rejected = append(st.Rejected, r)
		}
	}
	if len(c.writes) == 0 {
		return nil
	}
	res, err := store.Write(ctx, c.writes)
	if err != nil {
		// A conflict or bad write inside a Bundle transaction rejects that Bundle only.
		if kiln.ErrorCode(err) != kiln.EINTERNAL && len(c.items) == 1 && c.items[0].bundle {
			st.RejectedCount++
			st.Rejected = append(st.Rejected, Rejected{File: c.items[0].file, Reason: kiln.ErrorMessage(err)})
			return nil
		}
		return fmt.Errorf("write batch: %w", err)
	}
	for _, r := range res {
		if r.Unchanged {
			st.Unchanged++
			continue
		}
		st.Written[r.Type]++
	}
	return nil
}

func parseChunk(c *chunk, opt LoadOptions) {
	for _, it := range c.items {
		if it.bundle && it.body == nil {
			c.rej = append(c.rej, Rejected{File: it.file, Line: 1, Reason: fmt.Sprintf("file is larger than the import limit of %d bytes", opt.MaxLine)})
			continue
		}
		if it.bundle {
			dec := json.NewDecoder(bytes.NewReader(it.body))
			dec.UseNumber()
			var m map[string]any
			if err := dec.Decode(&m); err != nil {
				c.rej = append(c.rej, Rejected{File: it.file, Line: 1, Reason: "not a JSON object: " + err.Error()})
				continue
			}
			if rt, _ := m["resourceType"].(string); rt != "Bundle" {
				p, err := fhir.FromMap(m)
				if err != nil {
					c.rej = append(c.rej, Rejected{File: it.file, Line: 1, Reason: kiln.ErrorMessage(err)})
					continue
				}
				if p.ID == "" {
					p.ID = opt.NewID()
				}
				c.writes = append(c.writes, fhir.Prepare(p, p.ID, opt.Ref))
				continue
			}
			_, entries, err := PrepareBundle(m, BundleOptions{Ref: opt.Ref, NewID: opt.NewID, KeepIDs: true})
			if err != nil {
				c.rej = append(c.rej, Rejected{File: it.file, Reason: kiln.ErrorMessage(err)})
				continue
			}
			for _, e := range entries {
				if e.Err != nil {
					c.rej = append(c.rej, Rejected{File: it.file, Line: e.Index, Reason: kiln.ErrorMessage(e.Err)})
					continue
				}
				c.writes = append(c.writes, e.Write)
			}
			continue
		}
		p, err := fhir.Parse(it.body)
		if err != nil {
			c.rej = append(c.rej, Rejected{File: it.file, Line: it.line, Reason: kiln.ErrorMessage(err)})
			continue
		}
		if p.ID == "" {
			p.ID = opt.NewID()
		}
		c.writes = append(c.writes, fhir.Prepare(p, p.ID, opt.Ref))
	}
	// The raw lines are no longer needed; drop them before the chunk waits to be written.
	for i := range c.items {
		c.items[i].body = nil
	}
}

func listFiles(paths []string) ([]string, error) {
	var files []string
	for _, p := range paths {
		info, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("import: %w", err)
		}
		if !info.IsDir() {
			files = append(files, p)
			continue
		}
		err = filepath.WalkDir(p, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !d.IsDir() && loadable(path) {
				files = append(files, path)
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("import: %w", err)
		}
	}
	return files, nil
}

func loadable(path string) bool {
	for _, ext := range []string{".ndjson", ".ndjson.gz", ".json", ".json.gz", ".jsonl", ".jsonl.gz"} {
		if strings.HasSuffix(path, ext) {
			return true
		}
	}
	return false
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func readFiles(ctx context.Context, files []string, opt LoadOptions, out chan<- chunk, counter *atomic.Int64) error {
	seq := 0
	send := func(items []item) error {
		select {
		case out <- chunk{seq: seq, items: items}:
			seq++
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	for _, path := range files {
		if err := readFile(ctx, path, opt, send, counter); err != nil {
			return err
		}
	}
	return nil
}

func readFile(ctx context.Context, path string, opt LoadOptions, send func([]item) error, counter *atomic.Int64) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	defer f.Close()
	var r io.Reader = countingReader{r: f, n: counter}
	if strings.HasSuffix(path, ".gz") {
		gz, err := gzip.NewReader(r)
		if err != nil {
			return fmt.Errorf("import %s: %w", path, err)
		}
		defer gz.Close()
		r = gz
	}
	br := bufio.NewReaderSize(r, 1<<20)
	name := strings.TrimSuffix(path, ".gz")
	if !strings.HasSuffix(name, ".ndjson") && !strings.HasSuffix(name, ".jsonl") {
		// A .json file holds one resource or Bundle: one transaction of its own.
		body, err := io.ReadAll(io.LimitReader(br, int64(opt.MaxLine)+1))
		if err != nil {
			return fmt.Errorf("import %s: %w", path, err)
		}
		if len(body) > opt.MaxLine {
			return send([]item{{file: path, line: 1, body: nil, bundle: true}})
		}
		return send([]item{{file: path, line: 1, body: body, bundle: true}})
	}
	items := make([]item, 0, opt.Batch)
	line := 0
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		b, err := readLine(br, opt.MaxLine)
		if len(b) > 0 || errors.Is(err, errLineTooLong) {
			line++
			if errors.Is(err, errLineTooLong) {
				// Reported as a rejected line: an empty body fails to parse with a clear reason.
				items = append(items, item{file: path, line: line, body: []byte(`"line longer than the import limit"`)})
				err = nil
			} else if t := bytes.TrimSpace(b); len(t) > 0 {
				items = append(items, item{file: path, line: line, body: t})
			}
		} else if err == nil {
			line++
		}
		if len(items) == opt.Batch {
			if serr := send(items); serr != nil {
				return serr
			}
			items = make([]item, 0, opt.Batch)
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("import %s line %d: %w", path, line+1, err)
		}
	}
	if len(items) > 0 {
		return send(items)
	}
	return nil
}

var errLineTooLong = errors.New("line too long")

// readLine returns the next line without its newline, copying it, or
// errLineTooLong after skipping a line longer than max.
func readLine(br *bufio.Reader, max int) ([]byte, error) {
	var buf []byte
	for {
		frag, err := br.ReadSlice('\n')
		if len(buf)+len(frag) > max+1 {
			// Skip the rest of the line.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			if err != nil && !errors.Is(err, io.EOF) {
				return nil, err
			}
			return nil, errLineTooLong
		}
		buf = append(buf, frag...)
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if len(buf) > 0 && buf[len(buf)-1] == '\n' {
			buf = buf[:len(buf)-1]
		}
		return buf, err
	}
}
