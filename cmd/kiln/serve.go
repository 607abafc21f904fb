package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/httpapi"
	"github.com/kiln-fhir/kiln/ingest"
	"github.com/kiln-fhir/kiln/kafka"
	"github.com/kiln-fhir/kiln/metrics"
	"github.com/kiln-fhir/kiln/synth"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

type serveConfig struct {
	store                           storeFlags
	addr, data, basePath, publicURL string
	maxBody                         int64
	unitSize                        int
	maxFileResources, maxFileBytes  int64
	retention                       time.Duration
	maxJobs, maxJobsPerClient       int
	retryAfter, pollBurst           int
	logLevel, logFormat             string
	demo                            bool
	demoPatients                    int
	kafka                           kafkaFlags
	sink                            sinkFlags
	leaderLease                     time.Duration
	work                            workerFlags
	auth                            authFlags
	launch                          launcherFlags
	kickoffRate, maxDownloads       int
	maxClientDownloads              int
	readHeaderTimeout, idleTimeout  time.Duration
	shutdownGrace                   time.Duration
	metricsAddr                     string
	noMetrics                       bool
}

type kafkaFlags struct {
	brokers, topic, clientID, source string
	tls                              bool
	tlsCA                            string
	sasl, saslUser, saslPasswordFile string
	resourceTopic, resourceTypes     string
}

// base is the FHIR base path to join to URLs: "" when Kiln serves at the
// root (--base-path / or "").
func (c *serveConfig) base() string { return httpapi.CleanBasePath(c.basePath) }

func serveFlags(fs *flag.FlagSet) *serveConfig {
	c := &serveConfig{}
	fs.StringVar(&c.addr, "addr", "127.0.0.1:8080", "address to listen on")
	c.store.register(fs)
	fs.StringVar(&c.basePath, "base-path", "/4_0_0", "FHIR base path")
	fs.StringVar(&c.publicURL, "public-url", "", "scheme://host[:port] clients reach Kiln at, for Content-Location, manifest and SMART URLs (default on loopback: the listen address; required beyond loopback, so that a forged Host header cannot choose them)")
	fs.Int64Var(&c.maxBody, "max-body-bytes", 16<<20, "largest request body accepted")
	c.work.register(fs)
	fs.IntVar(&c.unitSize, "export-unit-size", 100_000, "resources per work unit of a system export")
	fs.Int64Var(&c.maxFileResources, "max-file-resources", 1_000_000, "an export file is split before it passes this many resources")
	fs.Int64Var(&c.maxFileBytes, "max-file-bytes", 1<<30, "an export file is split before it passes this many bytes")
	fs.DurationVar(&c.retention, "export-retention", 24*time.Hour, "how long finished exports' files are kept")
	fs.IntVar(&c.maxJobs, "max-exports", 10, "unfinished exports the server runs at once; more get 429")
	fs.IntVar(&c.maxJobsPerClient, "max-exports-per-client", 3, "unfinished exports one client may have; more get 429")
	fs.IntVar(&c.retryAfter, "retry-after", 2, "seconds status responses ask clients to wait (Retry-After)")
	fs.IntVar(&c.pollBurst, "poll-burst", 10, "status polls in a row sooner than half of Retry-After before 429 (-1: never)")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.logFormat, "log-format", "text", "text or json")
	fs.BoolVar(&c.demo, "demo", false, "seed generated sample patients into an empty store and print example requests")
	fs.IntVar(&c.demoPatients, "demo-patients", 50, "patients --demo generates")
	c.sink.register(fs)
	c.auth.register(fs)
	c.launch.register(fs)
	fs.IntVar(&c.kickoffRate, "kickoff-rate", 30, "export kick-offs per minute per client (burst 10); more get 429 (-1: no limit)")
	fs.IntVar(&c.maxDownloads, "max-downloads", 32, "concurrent export file downloads; more get 429")
	fs.IntVar(&c.maxClientDownloads, "max-downloads-per-client", 0, "concurrent export file downloads of one client (default a quarter of --max-downloads); more get 429")
	fs.DurationVar(&c.readHeaderTimeout, "read-header-timeout", 10*time.Second, "time a client has to send request headers (slowloris guard)")
	fs.DurationVar(&c.idleTimeout, "idle-timeout", 2*time.Minute, "keep-alive connections idle longer are closed")
	fs.DurationVar(&c.shutdownGrace, "shutdown-grace", 30*time.Second, "on SIGTERM, how long requests in flight may finish; running export units are handed back")
	fs.StringVar(&c.metricsAddr, "metrics-addr", "", "serve /metrics on this loopback address without authentication (default: /metrics on --addr, for access/*.read tokens)")
	fs.BoolVar(&c.noMetrics, "no-metrics", false, "turn /metrics off")
	fs.DurationVar(&c.leaderLease, "leader-lease", 15*time.Second, "with PostgreSQL, how long the export coordinator's leadership lasts unrenewed: another API server takes maintenance over within it when the leader dies")
	k := &c.kafka
	fs.StringVar(&k.brokers, "kafka-brokers", "", "host:port,… of Kafka brokers; events are off when empty")
	fs.StringVar(&k.topic, "kafka-topic", "fhir.bulk_export.events", "topic of bulk export events")
	fs.StringVar(&k.clientID, "kafka-client-id", "kiln", "Kafka client id")
	fs.StringVar(&k.source, "kafka-source", "", "CloudEvents source (default: the server's base URL)")
	fs.BoolVar(&k.tls, "kafka-tls", false, "connect to the brokers with TLS")
	fs.StringVar(&k.tlsCA, "kafka-tls-ca", "", "PEM CA bundle to trust for --kafka-tls (default: the system's)")
	fs.StringVar(&k.sasl, "kafka-sasl", "", "SASL mechanism: plain, scram-sha-256 or scram-sha-512")
	fs.StringVar(&k.saslUser, "kafka-sasl-user", "", "SASL user")
	fs.StringVar(&k.saslPasswordFile, "kafka-sasl-password-file", "", "file holding the SASL password")
	fs.StringVar(&k.resourceTopic, "kafka-resource-topic", "", "topic of resource-change events (off when empty)")
	fs.StringVar(&k.resourceTypes, "kafka-resource-types", "", "comma-separated types whose changes are sent to --kafka-resource-topic (* for all)")
	return c
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: use text or json", format)
}

func cmdServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kiln serve", flag.ContinueOnError)
	c := serveFlags(fs)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: kiln serve [flags]\n\nRuns the FHIR server on the embedded store in --data.\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	log, err := newLogger(stderr, c.logLevel, c.logFormat)
	if err != nil {
		return err
	}
	c.data = c.store.data
	db, closer, err := c.store.open(ctx)
	if err != nil {
		return err
	}
	defer closer.Close()
	sink, err := c.sink.open(ctx, c.data)
	if err != nil {
		return err
	}
	if err := c.auth.checkBind(c.addr, log); err != nil {
		return err
	}
	if !c.noMetrics && c.metricsAddr != "" {
		// The metrics listener has no authentication: it stays on loopback
		// (a scraper beside the server, or a port-forward).
		if loopback, err := isLoopback(c.metricsAddr); err != nil || !loopback {
			return fmt.Errorf("--metrics-addr %s: the metrics listener has no authentication and serves every tenant's totals, so it must be a loopback address (scrape /metrics on the main port with an access/*.read token otherwise)", c.metricsAddr)
		}
	}
	ln, err := net.Listen("tcp", c.addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", c.addr, err)
	}
	public, err := publicURL(c.publicURL, c.addr, ln.Addr())
	if err != nil {
		ln.Close()
		return err
	}
	launcher, err := c.launch.launcher(&c.store, &c.sink, log)
	if err != nil {
		ln.Close()
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	met := metrics.New(reg, metrics.Sources{Jobs: db, Outbox: db})
	exp := export.New(db, db, sink, export.Config{
		Metrics: met, Launcher: launcher, MaxLaunches: c.launch.maxLaunches,
		Workers: c.work.workers, UnitSize: c.unitSize, MaxFileResources: c.maxFileResources, MaxFileBytes: c.maxFileBytes,
		Retention: c.retention, MaxActiveJobs: c.maxJobs, MaxActiveJobsPerOwner: c.maxJobsPerClient, Lease: c.work.lease, LeaderLease: c.leaderLease,
		Ref: fhir.Options{Bases: []string{public + c.base()}}, Logger: log,
	})
	relay, err := setupKafka(db, &c.kafka, public+c.base(), log)
	if err != nil {
		ln.Close()
		return err
	}
	if c.demo {
		if err := seedDemo(ctx, db, c, log); err != nil {
			ln.Close()
			return err
		}
	}
	hc := httpapi.Config{
		BasePath: "/" + strings.TrimPrefix(c.base(), "/"), PublicURL: public, MaxBodyBytes: c.maxBody,
		RetryAfter: c.retryAfter, PollBurst: c.pollBurst, Logger: log,
		Metrics: met, KickOffsPerMinute: c.kickoffRate, MaxDownloads: c.maxDownloads, MaxDownloadsPerClient: c.maxClientDownloads,
	}
	metricsHandler := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	if !c.noMetrics && c.metricsAddr == "" {
		hc.MetricsHandler = metricsHandler
	}
	if err := c.auth.setup(&hc, db, public, c.base(), c.data); err != nil {
		ln.Close()
		return err
	}
	if _, urls := sink.(kiln.URLSink); urls {
		hc.RequiresAccessToken = false
	}
	// Ready while the store answers: a load balancer or Kubernetes then
	// sends no requests to a server whose database is away.
	ready := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return db.Ping(ctx)
	}
	api := httpapi.New(db, exp, hc, ready)
	srv := &http.Server{
		Handler:           api,
		ReadHeaderTimeout: c.readHeaderTimeout,
		ReadTimeout:       5 * time.Minute,
		IdleTimeout:       c.idleTimeout,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	runCtx, stopRun := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := exp.Run(runCtx); err != nil {
			log.Error("export workers stopped", "err", err)
		}
	}()
	if relay != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer relay.Client.Close()
			relay.Run(runCtx)
		}()
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	if !c.noMetrics && c.metricsAddr != "" {
		ms := &http.Server{Addr: c.metricsAddr, Handler: metricsHandler, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := ms.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics listener", "err", err)
			}
		}()
		defer ms.Close()
	}
	log.Info("kiln serving", "addr", ln.Addr().String(), "base", public+c.base(), "data", c.data, "version", version())
	if c.demo {
		var tokenCmd string
		if c.auth.mode == "jwt" {
			tokenCmd = fmt.Sprintf("kiln token --data %s --public-url %s --base-path %s", c.data, public, c.basePath)
			if c.auth.tenancy == string(kiln.TenancyAccessTags) {
				tokenCmd += " --scope 'system/*.read access/*.read'"
			}
		}
		printDemo(stdout, public+c.base(), tokenCmd)
	}
	select {
	case err := <-serveErr:
		stopRun()
		wg.Wait()
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down: finishing requests, handing back running export units")
	shut, cancel := context.WithTimeout(context.Background(), c.shutdownGrace)
	defer cancel()
	err = srv.Shutdown(shut)
	stopRun()
	wg.Wait()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

func seedDemo(ctx context.Context, db backend, c *serveConfig, log *slog.Logger) error {
	counts, err := db.Counts(ctx)
	if err != nil {
		return err
	}
	if len(counts) > 0 {
		log.Info("demo: the store already has data; not seeding")
		return nil
	}
	dir, err := os.MkdirTemp("", "kiln-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if _, err := synth.Generate(ctx, dir, synth.Options{Patients: c.demoPatients, Seed: 1}); err != nil {
		return err
	}
	st, err := ingest.Load(ctx, db, []string{dir}, ingest.LoadOptions{NewID: uuid.NewString})
	if err != nil {
		return err
	}
	var n int64
	for _, v := range st.Written {
		n += v
	}
	log.Info("demo: seeded generated patients", "patients", c.demoPatients, "resources", n)
	return nil
}

// printDemo shows requests to paste; with authentication on, they carry a
// token from tokenCmd.
func printDemo(w io.Writer, base, tokenCmd string) {
	fmt.Fprintf(w, "\nKiln is running with demo data at %s\n", base)
	if tokenCmd != "" {
		fmt.Fprintf(w, `
Authentication is on: get a token (system/*.read, valid 5 minutes) and send it with each request:
  export TOKEN=$(%s)
  alias curl='curl -H "Authorization: Bearer $TOKEN"'
`, tokenCmd)
	}
	fmt.Fprintf(w, `
Try:
  curl -s %[1]s/metadata | head -c 300; echo
  curl -s '%[1]s/Patient?_count=2'
  curl -s '%[1]s/Group/all-patients'  | head -c 300; echo

  # Start a system-level export and poll it:
  curl -si -X POST '%[1]s/$export?_type=Patient,Observation' -H 'Prefer: respond-async' | grep -i content-location
  curl -si <Content-Location>          # 202 + X-Progress while running, 200 + manifest when done
  curl -s  <output url from the manifest> | head -3

  # Patient- and Group-level exports:
  curl -si '%[1]s/Patient/$export?_since=2020-01-01' | grep -i content-location
  curl -si '%[1]s/Group/all-patients/$export' | grep -i content-location

  # Cancel (or delete a finished export):
  curl -si -X DELETE <Content-Location>
`, base)
}

// setupKafka turns on the outbox and returns its relay, or nil when Kafka is off.
func setupKafka(db backend, k *kafkaFlags, base string, log *slog.Logger) (*kafka.Relay, error) {
	if k.brokers == "" {
		if k.resourceTopic != "" {
			return nil, fmt.Errorf("--kafka-resource-topic needs --kafka-brokers")
		}
		return nil, nil
	}
	cfg := kafka.Config{Brokers: splitList(k.brokers), ClientID: k.clientID, TLS: k.tls, TLSCAFile: k.tlsCA, SASL: k.sasl, SASLUser: k.saslUser}
	if k.saslPasswordFile != "" {
		b, err := os.ReadFile(k.saslPasswordFile)
		if err != nil {
			return nil, fmt.Errorf("--kafka-sasl-password-file: %w", err)
		}
		cfg.SASLPassword = strings.TrimSpace(string(b))
	}
	client, err := kafka.NewClient(cfg)
	if err != nil {
		return nil, err
	}
	source := k.source
	if source == "" {
		source = base
	}
	ev := &kafka.Events{Topic: k.topic, Source: source, ResourceTopic: k.resourceTopic, ResourceTypes: map[string]bool{}}
	for _, t := range splitList(k.resourceTypes) {
		ev.ResourceTypes[t] = true
	}
	db.SetEvents(ev)
	log.Info("kafka events on", "brokers", k.brokers, "topic", k.topic, "resourceTopic", k.resourceTopic)
	return &kafka.Relay{Outbox: db, Client: client, Logger: log}, nil
}
