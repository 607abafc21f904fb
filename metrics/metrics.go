// Package metrics defines Kiln's Prometheus metrics (client_golang). Every
// method is safe on a nil *Metrics, which records nothing.
package metrics

import (
	"context"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kiln-fhir/kiln"
)

// Metrics holds the collectors, registered on one registry.
type Metrics struct {
	units        *prometheus.CounterVec
	resources    *prometheus.CounterVec
	bytes        *prometheus.CounterVec
	exportSecs   prometheus.Histogram
	unitSecs     *prometheus.HistogramVec
	httpRequests *prometheus.CounterVec
	httpSecs     *prometheus.HistogramVec
	storeSecs    *prometheus.HistogramVec
	authFailures *prometheus.CounterVec
}

// Sources are read at scrape time for the gauges.
type Sources struct {
	Jobs   kiln.JobStore
	Outbox kiln.Outbox
}

// New registers Kiln's metrics on reg.
func New(reg prometheus.Registerer, src Sources) *Metrics {
	m := &Metrics{
		units: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_export_units_total",
			Help: "Export work units by event: claimed, finished, redone (claimed again after a crash or lost lease), failed."}, []string{"event"}),
		resources: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_export_resources_total",
			Help: "Resources written to export files, by resource type."}, []string{"type"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_export_bytes_total",
			Help: "Bytes written to export files, by resource type."}, []string{"type"}),
		exportSecs: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "kiln_export_duration_seconds",
			Help: "Kick-off to completion of finished exports.", Buckets: prometheus.ExponentialBuckets(0.1, 2, 16)}),
		unitSecs: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "kiln_export_unit_duration_seconds",
			Help: "Run time of export work units, by unit kind.", Buckets: prometheus.ExponentialBuckets(0.01, 2, 16)}, []string{"kind"}),
		httpRequests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_http_requests_total",
			Help: "HTTP requests by route (the mux pattern) and status code."}, []string{"route", "code"}),
		httpSecs: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "kiln_http_request_duration_seconds",
			Help: "HTTP request latency by route.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}, []string{"route"}),
		storeSecs: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "kiln_store_query_duration_seconds",
			Help: "Store call latency by operation (read, search, write, scan).", Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18)}, []string{"op"}),
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_auth_failures_total",
			Help: "Rejected bearer tokens and token requests, by reason."}, []string{"reason"}),
	}
	reg.MustRegister(m.units, m.resources, m.bytes, m.exportSecs, m.unitSecs, m.httpRequests, m.httpSecs, m.storeSecs, m.authFailures)
	if src.Jobs != nil || src.Outbox != nil {
		reg.MustRegister(&gauges{src: src})
	}
	return m
}

// Unit counts a unit event.
func (m *Metrics) Unit(event string) {
	if m != nil {
		m.units.WithLabelValues(event).Inc()
	}
}

// UnitDone records a finished unit's output and run time.
func (m *Metrics) UnitDone(kind string, parts []kiln.Part, d time.Duration) {
	if m == nil {
		return
	}
	m.units.WithLabelValues("finished").Inc()
	m.unitSecs.WithLabelValues(kind).Observe(d.Seconds())
	for _, p := range parts {
		if p.Kind == "output" {
			m.resources.WithLabelValues(p.Type).Add(float64(p.Count))
			m.bytes.WithLabelValues(p.Type).Add(float64(p.Bytes))
		}
	}
}

// ExportDone records a completed export's duration.
func (m *Metrics) ExportDone(d time.Duration) {
	if m != nil {
		m.exportSecs.Observe(d.Seconds())
	}
}

// HTTP records one request.
func (m *Metrics) HTTP(route string, code int, d time.Duration) {
	if m == nil {
		return
	}
	if route == "" {
		route = "unmatched"
	}
	m.httpRequests.WithLabelValues(route, strconv.Itoa(code)).Inc()
	m.httpSecs.WithLabelValues(route).Observe(d.Seconds())
}

// Store records one store call.
func (m *Metrics) Store(op string, d time.Duration) {
	if m != nil {
		m.storeSecs.WithLabelValues(op).Observe(d.Seconds())
	}
}

// AuthFailure counts a rejected token.
func (m *Metrics) AuthFailure(reason string) {
	if m != nil {
		m.authFailures.WithLabelValues(reason).Inc()
	}
}

var (
	jobsDesc    = prometheus.NewDesc("kiln_export_jobs", "Export jobs by state.", []string{"state"}, nil)
	queueDesc   = prometheus.NewDesc("kiln_export_queue_depth", "Export work units not yet finished, over all unfinished jobs.", nil, nil)
	backlogDesc = prometheus.NewDesc("kiln_outbox_backlog", "Events waiting in the outbox for the broker.", nil, nil)
)

// gauges reads job states, queue depth and outbox backlog from the store at scrape time.
type gauges struct{ src Sources }

func (g *gauges) Describe(ch chan<- *prometheus.Desc) {
	ch <- jobsDesc
	ch <- queueDesc
	ch <- backlogDesc
}

func (g *gauges) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if g.src.Jobs != nil {
		if jobs, err := g.src.Jobs.Jobs(ctx); err == nil {
			counts := map[kiln.JobState]int{kiln.JobAccepted: 0, kiln.JobInProgress: 0, kiln.JobCompleted: 0, kiln.JobFailed: 0}
			queue := 0
			for _, j := range jobs {
				counts[j.State]++
				if !j.Finished() {
					if total, done, err := g.src.Jobs.UnitCounts(ctx, j.ID); err == nil {
						queue += total - done
					}
				}
			}
			for st, n := range counts {
				ch <- prometheus.MustNewConstMetric(jobsDesc, prometheus.GaugeValue, float64(n), string(st))
			}
			ch <- prometheus.MustNewConstMetric(queueDesc, prometheus.GaugeValue, float64(queue))
		}
	}
	if g.src.Outbox != nil {
		if n, err := g.src.Outbox.OutboxSize(ctx); err == nil {
			ch <- prometheus.MustNewConstMetric(backlogDesc, prometheus.GaugeValue, float64(n))
		}
	}
}
