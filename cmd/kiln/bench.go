package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/httpapi"
	"github.com/kiln-fhir/kiln/ingest"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/postgres"
	"github.com/kiln-fhir/kiln/synth"
)

// cmdBench measures Kiln end to end on generated data: import, then system,
// Patient and Group exports through the HTTP API (kick-off, poll, download
// every file). Memory is the process's peak RSS per phase (Linux VmHWM,
// reset between phases), which covers the server and the benchmark client.
func cmdBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "load" {
		return cmdBenchLoad(ctx, args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("kiln bench", flag.ContinueOnError)
	patients := fs.Int("patients", 1000, "patients to generate")
	seed := fs.Uint64("seed", 1, "generator seed")
	work := fs.String("work", "", "working folder (default: a temporary one, removed afterwards)")
	groupSize := fs.Int("group-patients", 1000, "patients in the Group exported")
	workers := fs.Int("export-workers", runtime.NumCPU(), "export workers")
	var sf storeFlags
	sf.register(fs)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: kiln bench [flags]\n       kiln bench load [flags]   (see kiln bench load -h)\n\nGenerates patients, imports them and exports them through the HTTP API, printing\nresources, bytes, seconds, resources/s, MB/s and peak RSS per phase.\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	dir := *work
	if dir == "" {
		d, err := os.MkdirTemp("", "kiln-bench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	genDir := filepath.Join(dir, "generated")
	fmt.Fprintf(stdout, "kiln bench: %d patients, %d CPUs, %s, Go %s\n", *patients, runtime.NumCPU(), cpuModel(), runtime.Version())
	start := time.Now()
	st, err := synth.Generate(ctx, genDir, synth.Options{Patients: *patients, Seed: *seed})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "generated %d resources in %.1fs; store: %s\n\n", st.Total(), time.Since(start).Seconds(), sf.kind)
	// The limits, measured here beside Kiln: each phase below is also a
	// ratio to one of them (import to the raw insert, exports to the raw
	// scan of the same store; the file copy is the bytes' own limit).
	var limits struct{ copy, insert, scan limit }
	var err2 error
	if limits.copy, err2 = copyLimit(genDir, filepath.Join(dir, "copy-limit.ndjson")); err2 != nil {
		return fmt.Errorf("file copy limit: %w", err2)
	}
	row := func(name string, n, bytes int64, d time.Duration, to limit) {
		ratio := "-"
		if to.d > 0 {
			ratio = fmt.Sprintf("%.2f", float64(n)/d.Seconds()/to.rate())
		}
		fmt.Fprintf(stdout, "%-16s %12d %10.1f %9.2f %12.0f %8.1f %10.0f %9s\n", name, n, float64(bytes)/1e6, d.Seconds(), float64(n)/d.Seconds(), float64(bytes)/1e6/d.Seconds(), peakRSS(), ratio)
	}
	dataDir := filepath.Join(dir, "data")
	sf.data = dataDir
	if sf.kind == "postgres" && sf.postgresSchema == "" {
		// A schema of its own, dropped afterwards, so the bench starts empty.
		sf.postgresSchema = fmt.Sprintf("kiln_bench_%d", time.Now().UnixNano())
		defer postgres.DropSchema(context.WithoutCancel(ctx), sf.postgresURL, sf.postgresSchema)
	}
	db, closer, err := sf.open(ctx)
	if err != nil {
		return err
	}
	defer closer.Close()
	if sf.kind == "postgres" {
		limits.insert, err = pgInsertLimit(ctx, sf.postgresURL, sf.postgresSchema, genDir)
	} else {
		limits.insert, err = sqliteInsertLimit(ctx, genDir, dir)
	}
	if err != nil {
		return fmt.Errorf("raw insert limit: %w", err)
	}

	resetPeakRSS()
	runtime.GC()
	start = time.Now()
	ls, err := ingest.Load(ctx, db, []string{genDir}, ingest.LoadOptions{NewID: uuid.NewString})
	if err != nil {
		return err
	}
	var inBytes int64
	if entries, err := os.ReadDir(genDir); err == nil {
		for _, e := range entries {
			if info, err := e.Info(); err == nil {
				inBytes += info.Size()
			}
		}
	}
	importTime := time.Since(start)
	if sf.kind == "postgres" {
		limits.scan, err = pgScanLimit(ctx, sf.postgresURL, sf.postgresSchema, filepath.Join(dir, "scan-limit.ndjson"))
	} else {
		limits.scan, err = sqliteScanLimit(ctx, filepath.Join(dataDir, "kiln.db"), filepath.Join(dir, "scan-limit.ndjson"))
	}
	if err != nil {
		return fmt.Errorf("raw scan limit: %w", err)
	}
	fmt.Fprintf(stdout, "%-16s %12s %9s %12s\n", "limit", "resources", "seconds", "resources/s")
	for _, l := range []limit{limits.copy, limits.insert, limits.scan} {
		fmt.Fprintf(stdout, "%-16s %12d %9.2f %12.0f\n", l.name, l.resources, l.d.Seconds(), l.rate())
	}
	fmt.Fprintf(stdout, "\n%-16s %12s %10s %9s %12s %8s %10s %9s\n", "phase", "resources", "MB", "seconds", "resources/s", "MB/s", "peak RSS MB", "to limit")
	row("import", ls.Read, inBytes, importTime, limits.insert)
	os.RemoveAll(genDir)

	sink, err := localfs.New(filepath.Join(dataDir, "exports"))
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	base := "http://" + ln.Addr().String() + "/4_0_0"
	svc := export.New(db, db, sink, export.Config{Workers: *workers, Logger: log, Ref: fhir.Options{Bases: []string{base}}})
	api := httpapi.New(db, svc, httpapi.Config{PollBurst: -1, RetryAfter: 1, Logger: log}, nil)
	srv := &http.Server{Handler: api, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	defer srv.Close()
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	go svc.Run(runCtx)

	// A Group of the first group-patients patients.
	ids, err := db.PatientsAt(ctx, time.Now().Add(time.Hour), nil)
	if err != nil {
		return err
	}
	ids = ids[:min(*groupSize, len(ids))]
	var members []map[string]any
	for _, id := range ids {
		members = append(members, map[string]any{"entity": map[string]string{"reference": "Patient/" + id}})
	}
	gb, _ := json.Marshal(map[string]any{"resourceType": "Group", "id": "bench", "type": "person", "actual": true, "member": members})
	p, err := fhir.Parse(gb)
	if err != nil {
		return err
	}
	if _, err := db.Write(ctx, []kiln.Write{fhir.Prepare(p, "bench", fhir.Options{})}); err != nil {
		return err
	}

	for _, e := range []struct{ name, path string }{
		{"system export", "/$export"},
		{"patient export", "/Patient/$export"},
		{"group export", "/Group/bench/$export"},
		{"filtered export", "/$export?_type=Observation&_typeFilter=" + url.QueryEscape("Observation?category=laboratory")},
	} {
		runtime.GC()
		resetPeakRSS()
		start := time.Now()
		n, b, err := benchExport(ctx, base+e.path)
		if err != nil {
			return fmt.Errorf("%s: %w", e.name, err)
		}
		to := limits.scan
		if strings.Contains(e.path, "_typeFilter") {
			to = limit{} // it reads one type, not the whole store: no like-for-like limit
		}
		row(e.name, n, b, time.Since(start), to)
	}

	// Analytics output: the same system export as Parquet (counted from the
	// manifest), and a view of every Observation (one row each).
	runtime.GC()
	resetPeakRSS()
	start = time.Now()
	n, b, err := benchExport(ctx, base+"/$export?_outputFormat=parquet")
	if err != nil {
		return fmt.Errorf("parquet export: %w", err)
	}
	row("parquet export", n, b, time.Since(start), limits.scan)
	runtime.GC()
	resetPeakRSS()
	start = time.Now()
	if n, b, err = benchViewExport(ctx, base, benchView); err != nil {
		return fmt.Errorf("view export: %w", err)
	}
	row("view export", n, b, time.Since(start), limit{})
	return nil
}

// benchView is the view of the view export phase: a row per Observation.
const benchView = `{"resourceType":"ViewDefinition","name":"observations","resource":"Observation","select":[{"column":[
 {"name":"id","path":"getResourceKey()"},{"name":"patient","path":"subject.getReferenceKey(Patient)"},
 {"name":"code","path":"code.coding.first().code"},{"name":"value","path":"value.ofType(Quantity).value","type":"decimal"},
 {"name":"effective","path":"effective.ofType(dateTime)","type":"dateTime"}]}]}`

// benchViewExport runs a $viewdefinition-export of view as NDJSON and
// downloads every file, counting rows (lines) and bytes.
func benchViewExport(ctx context.Context, base, view string) (int64, int64, error) {
	body := `{"resourceType":"Parameters","parameter":[{"name":"view","part":[{"name":"viewResource","resource":` + view + `}]}]}`
	loc, done, err := kickAndWait(ctx, "POST", base+"/$viewdefinition-export", body)
	if err != nil {
		return 0, 0, err
	}
	defer remove(ctx, loc)
	var st struct {
		Parameter []struct {
			Name string
			Part []struct {
				Name     string
				ValueURI string `json:"valueUri"`
			}
		}
	}
	if err := json.Unmarshal(done, &st); err != nil {
		return 0, 0, err
	}
	var urls []string
	for _, p := range st.Parameter {
		for _, part := range p.Part {
			if p.Name == "output" && part.Name == "location" {
				urls = append(urls, part.ValueURI)
			}
		}
	}
	return download(urls, true)
}

// benchExport kicks off, polls and downloads every file, counting lines and bytes.
func benchExport(ctx context.Context, url string) (int64, int64, error) {
	loc, done, err := kickAndWait(ctx, "GET", url, "")
	if err != nil {
		return 0, 0, err
	}
	defer remove(ctx, loc)
	var m struct {
		Output []struct {
			URL   string
			Count int64
		}
	}
	if err := json.Unmarshal(done, &m); err != nil {
		return 0, 0, err
	}
	var urls []string
	var count int64
	for _, o := range m.Output {
		urls = append(urls, o.URL)
		count += o.Count
	}
	// Parquet files have no lines: their resources are the manifest's counts.
	parquet := strings.Contains(url, "_outputFormat=parquet")
	lines, size, err := download(urls, !parquet)
	if parquet {
		lines = count
	}
	return lines, size, err
}

// kickAndWait kicks an export off and polls it to its end, returning its
// status URL and the completed status body. Prefer: wait holds each poll
// until the export ends, so the measurement has no idle time after the data
// is ready. A failed view export (202, status failed) is an error.
func kickAndWait(ctx context.Context, method, url, body string) (string, []byte, error) {
	req, _ := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	req.Header.Set("Prefer", "respond-async")
	if body != "" {
		req.Header.Set("Content-Type", "application/fhir+json")
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", nil, err
	}
	res.Body.Close()
	if res.StatusCode != 202 {
		return "", nil, fmt.Errorf("kick-off: %s", res.Status)
	}
	loc := res.Header.Get("Content-Location")
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", loc, nil)
		req.Header.Set("Prefer", "wait=30")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			return loc, nil, err
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		switch {
		case res.StatusCode == 200:
			return loc, b, nil
		case res.StatusCode != 202 || bytes.Contains(b, []byte(`"failed"`)):
			return loc, nil, fmt.Errorf("status: %s %s", res.Status, b)
		}
	}
}

// download reads every file, counting bytes and, if asked, lines.
func download(urls []string, countLines bool) (int64, int64, error) {
	var lines, size int64
	buf := make([]byte, 256<<10)
	for _, u := range urls {
		res, err := http.Get(u)
		if err != nil {
			return 0, 0, err
		}
		for {
			n, err := res.Body.Read(buf)
			size += int64(n)
			if countLines {
				lines += int64(bytes.Count(buf[:n], []byte{'\n'}))
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				res.Body.Close()
				return 0, 0, err
			}
		}
		res.Body.Close()
	}
	return lines, size, nil
}

// remove deletes an export, so later phases start from the same disk state.
func remove(ctx context.Context, loc string) {
	req, _ := http.NewRequestWithContext(ctx, "DELETE", loc, nil)
	if res, err := http.DefaultClient.Do(req); err == nil {
		res.Body.Close()
	}
}

// peakRSS is the process's peak resident set in MB since the last reset (Linux).
func peakRSS() float64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}

// resetPeakRSS starts a new peak-RSS measurement (Linux clear_refs "5").
func resetPeakRSS() { _ = os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) }

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return runtime.GOARCH
}
