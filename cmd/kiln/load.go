package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// loadConfig is one run of kiln bench load against a running server.
type loadConfig struct {
	Base     string // FHIR base URL, e.g. http://127.0.0.1:8080/4_0_0
	Token    string // bearer token, if the server wants one
	Baseline time.Duration
	Duration time.Duration
	KickOffs int // clients that kick off exports at once, again and again
	Pollers  int // clients that poll the status of running exports
	Writers  int // clients that create resources through REST
	Readers  int // clients that read and search through REST
	// PollEvery is the pollers' interval (clients are asked for 2 s).
	PollEvery time.Duration
}

// loadClass collects the answers to one kind of request.
type loadClass struct {
	mu       sync.Mutex
	statuses map[int]int
	lat      []time.Duration
	errors   int
	lastErr  string
}

func (c *loadClass) add(status int, d time.Duration, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		c.errors++
		c.lastErr = err.Error()
		return
	}
	c.statuses[status]++
	c.lat = append(c.lat, d)
}

// count returns the answers with a status in [lo, hi].
func (c *loadClass) count(lo, hi int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for s, k := range c.statuses {
		if s >= lo && s <= hi {
			n += k
		}
	}
	return n
}

func (c *loadClass) percentile(p float64) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.lat) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(c.lat))
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

// loadReport is what a load run saw, by request class.
type loadReport struct {
	Classes map[string]*loadClass
	order   []string
	// Exports counts exports kicked off and completed during the run.
	Accepted, Completed int
}

func (r *loadReport) class(name string) *loadClass {
	if c, ok := r.Classes[name]; ok {
		return c
	}
	c := &loadClass{statuses: map[int]int{}}
	r.Classes[name] = c
	r.order = append(r.order, name)
	return c
}

// ServerErrors is the number of 5xx answers plus requests that got no answer.
func (r *loadReport) ServerErrors() int {
	n := 0
	for _, c := range r.Classes {
		n += c.count(500, 599) + c.errors
	}
	return n
}

func (r *loadReport) print(w io.Writer) {
	fmt.Fprintf(w, "%-22s %9s %8s %8s %8s  %s\n", "requests", "count", "p50 ms", "p99 ms", "max ms", "statuses")
	for _, name := range r.order {
		c := r.Classes[name]
		var codes []string
		for _, s := range slices.Sorted(func(yield func(int) bool) {
			for s := range c.statuses {
				if !yield(s) {
					return
				}
			}
		}) {
			codes = append(codes, fmt.Sprintf("%d×%d", s, c.statuses[s]))
		}
		if c.errors > 0 {
			codes = append(codes, fmt.Sprintf("no answer×%d (%s)", c.errors, c.lastErr))
		}
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		fmt.Fprintf(w, "%-22s %9d %8.1f %8.1f %8.1f  %s\n", name, len(c.lat)+c.errors, ms(c.percentile(0.5)), ms(c.percentile(0.99)), ms(c.percentile(1)), strings.Join(codes, " "))
	}
	fmt.Fprintf(w, "exports accepted %d, completed %d; 5xx or unanswered: %d\n", r.Accepted, r.Completed, r.ServerErrors())
}

// runLoad drives a server with export clients and REST clients at once: a
// baseline of REST reads alone, then KickOffs clients kicking off exports
// (each honouring 429's Retry-After and polling its own export), Pollers
// clients polling the running exports, and REST writers and readers, for
// Duration. Exports still running at the end are cancelled.
func runLoad(ctx context.Context, cfg loadConfig) (*loadReport, error) {
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 1024, IdleConnTimeout: time.Minute}}
	defer client.CloseIdleConnections()
	do := func(ctx context.Context, method, url, body string, hdr ...string) (*http.Response, []byte, time.Duration, error) {
		var rd io.Reader
		if body != "" {
			rd = strings.NewReader(body)
		}
		req, err := http.NewRequestWithContext(ctx, method, url, rd)
		if err != nil {
			return nil, nil, 0, err
		}
		req.Header.Set("Accept", "application/fhir+json")
		if body != "" {
			req.Header.Set("Content-Type", "application/fhir+json")
		}
		if cfg.Token != "" {
			req.Header.Set("Authorization", "Bearer "+cfg.Token)
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		start := time.Now()
		res, err := client.Do(req)
		if err != nil {
			return nil, nil, 0, err
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		return res, b, time.Since(start), err
	}

	// Patients to read and to write observations for.
	res, body, _, err := do(ctx, "GET", cfg.Base+"/Patient?_count=100", "")
	if err != nil {
		return nil, fmt.Errorf("list patients: %w", err)
	}
	if res.StatusCode != 200 {
		return nil, fmt.Errorf("list patients: %s: %.200s", res.Status, body)
	}
	var bundle struct {
		Entry []struct{ Resource struct{ ID string } }
	}
	if err := json.Unmarshal(body, &bundle); err != nil {
		return nil, fmt.Errorf("list patients: %w", err)
	}
	var patients []string
	for _, e := range bundle.Entry {
		patients = append(patients, e.Resource.ID)
	}
	if len(patients) == 0 {
		return nil, fmt.Errorf("the server has no patients to read; import some first")
	}

	rep := &loadReport{Classes: map[string]*loadClass{}}
	var mu sync.Mutex // guards rep's export counts and jobs
	var jobs []string
	// record counts an answer, unless the end of the run cut the request off.
	record := func(ctx context.Context, c *loadClass, res *http.Response, d time.Duration, err error) {
		if ctx.Err() == nil {
			c.add(statusOf(res), d, err)
		}
	}
	sleep := func(ctx context.Context, d time.Duration) {
		select {
		case <-ctx.Done():
		case <-time.After(d):
		}
	}
	reader := func(ctx context.Context, c *loadClass, seed uint64) {
		rng := rand.New(rand.NewPCG(seed, 1))
		for i := 0; ctx.Err() == nil; i++ {
			p := patients[rng.IntN(len(patients))]
			url := cfg.Base + "/Patient/" + p
			if i%2 == 1 {
				url = cfg.Base + "/Observation?patient=" + p + "&_count=20"
			}
			res, _, d, err := do(ctx, "GET", url, "")
			record(ctx, c, res, d, err)
		}
	}

	// Baseline: reads with nothing else running.
	bctx, cancel := context.WithTimeout(ctx, cfg.Baseline)
	var wg sync.WaitGroup
	idle := rep.class("REST read, idle")
	for i := range cfg.Readers {
		wg.Add(1)
		go func() { defer wg.Done(); reader(bctx, idle, uint64(i)) }()
	}
	wg.Wait()
	cancel()

	lctx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	kick, status, write, read := rep.class("export kick-off"), rep.class("export status"), rep.class("REST write"), rep.class("REST read, exporting")
	paths := []string{"/$export", "/Patient/$export", "/$export?_type=Patient,Observation,Condition"}
	for i := range cfg.KickOffs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for lctx.Err() == nil {
				res, _, d, err := do(lctx, "GET", cfg.Base+paths[i%len(paths)], "", "Prefer", "respond-async")
				record(lctx, kick, res, d, err)
				if err != nil || res.StatusCode != 202 {
					wait := 2 * time.Second
					if res != nil {
						if s, err := strconv.Atoi(res.Header.Get("Retry-After")); err == nil {
							wait = time.Duration(s) * time.Second
						}
					}
					sleep(lctx, wait)
					continue
				}
				loc := res.Header.Get("Content-Location")
				mu.Lock()
				rep.Accepted++
				jobs = append(jobs, loc)
				mu.Unlock()
				final := 0
				for lctx.Err() == nil {
					sleep(lctx, cfg.PollEvery)
					res, _, d, err := do(lctx, "GET", loc, "")
					record(lctx, status, res, d, err)
					if err != nil || res.StatusCode == 202 || res.StatusCode == 429 {
						continue
					}
					final = res.StatusCode
					break
				}
				if final == 200 {
					mu.Lock()
					rep.Completed++
					mu.Unlock()
				}
				mu.Lock()
				jobs = slices.DeleteFunc(jobs, func(j string) bool { return j == loc })
				mu.Unlock()
				// Done with it: cancel (or clean up) so the next kick-off has room.
				do(context.WithoutCancel(lctx), "DELETE", loc, "")
			}
		}()
	}
	for i := range cfg.Pollers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 2))
			for lctx.Err() == nil {
				mu.Lock()
				loc := ""
				if len(jobs) > 0 {
					loc = jobs[rng.IntN(len(jobs))]
				}
				mu.Unlock()
				if loc != "" {
					res, _, d, err := do(lctx, "GET", loc, "")
					// A job its owner has just cleaned up is a 404: not counted.
					if res == nil || res.StatusCode != 404 {
						record(lctx, status, res, d, err)
					}
				}
				sleep(lctx, cfg.PollEvery)
			}
		}()
	}
	for i := range cfg.Writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 3))
			for n := 0; lctx.Err() == nil; n++ {
				obs := fmt.Sprintf(`{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/%s"},"effectiveDateTime":"2026-11-27T10:00:00Z","valueQuantity":{"value":%d,"unit":"/min"}}`,
					patients[rng.IntN(len(patients))], 50+n%80)
				res, _, d, err := do(lctx, "POST", cfg.Base+"/Observation", obs)
				record(lctx, write, res, d, err)
			}
		}()
	}
	for i := range cfg.Readers {
		wg.Add(1)
		go func() { defer wg.Done(); reader(lctx, read, uint64(100+i)) }()
	}
	wg.Wait()
	for _, loc := range jobs {
		do(ctx, "DELETE", loc, "")
	}
	return rep, nil
}

func statusOf(res *http.Response) int {
	if res == nil {
		return 0
	}
	return res.StatusCode
}

// cmdBenchLoad is kiln bench load: runLoad against a running server.
func cmdBenchLoad(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kiln bench load", flag.ContinueOnError)
	cfg := loadConfig{}
	fs.StringVar(&cfg.Base, "url", "http://127.0.0.1:8080/4_0_0", "FHIR base URL of the server under load")
	fs.StringVar(&cfg.Token, "token", "", "bearer token to send (when the server runs with --auth)")
	fs.DurationVar(&cfg.Baseline, "baseline", 5*time.Second, "REST reads alone, before the load, for comparison")
	fs.DurationVar(&cfg.Duration, "duration", 60*time.Second, "how long the load runs")
	fs.IntVar(&cfg.KickOffs, "kickoffs", 50, "clients kicking off exports at once")
	fs.IntVar(&cfg.Pollers, "pollers", 200, "clients polling export status")
	fs.IntVar(&cfg.Writers, "writers", 4, "clients creating Observations through REST, back to back")
	fs.IntVar(&cfg.Readers, "readers", 4, "clients reading Patients and searching Observations, back to back")
	fs.DurationVar(&cfg.PollEvery, "poll-every", time.Second, "status poll interval of each poller")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: kiln bench load [flags]\n\nLoads a running Kiln with export kick-offs, status polls and REST writes and reads\nat once, and prints answers by status with latency percentiles per request kind.\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "kiln bench load: %s for %s (baseline %s): %d kick-off clients, %d pollers, %d writers, %d readers\n",
		cfg.Base, cfg.Duration, cfg.Baseline, cfg.KickOffs, cfg.Pollers, cfg.Writers, cfg.Readers)
	rep, err := runLoad(ctx, cfg)
	if err != nil {
		return err
	}
	rep.print(stdout)
	if n := rep.ServerErrors(); n > 0 {
		return fmt.Errorf("%d requests got a 5xx or no answer", n)
	}
	return nil
}
