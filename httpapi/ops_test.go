package httpapi_test

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/httpapi"
	"github.com/kiln-fhir/kiln/metrics"
)

func TestMetricsAndLimits(t *testing.T) {
	reg := prometheus.NewRegistry()
	var m *metrics.Metrics
	e := newEnv(t, envOpts{
		configure: func(e *env, hc *httpapi.Config, ec *export.Config) {
			m = metrics.New(reg, metrics.Sources{Jobs: e.db, Outbox: e.db.(kiln.Outbox)})
			hc.Metrics, ec.Metrics = m, m
			hc.MetricsHandler = promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
			hc.KickOffsPerMinute = 3
			hc.MaxDownloads = 1
		},
	})
	put(t, e, `{"resourceType":"Patient","id":"a"}`)
	// 20 MB of Observations: more than socket buffers hold, so an unread download stays open.
	for b := 0; b < 4; b++ {
		var bodies []string
		for i := range 5000 {
			bodies = append(bodies, obs(fmt.Sprintf("o%d-%d", b, i), "a", `,"note":[{"text":"`+strings.Repeat("n", 1000)+`"}]`))
		}
		put(t, e, bodies...)
	}
	// The kick-off rate: a burst of 3, then 429 with Retry-After.
	var locs []string
	for range 3 {
		locs = append(locs, e.kickOff("GET", "/$export", nil))
	}
	if r := e.do("GET", "/$export", nil); r.StatusCode != 429 || r.Header.Get("Retry-After") == "" {
		t.Fatalf("fourth kick-off: %d %q", r.StatusCode, r.Header.Get("Retry-After"))
	}
	man := e.mustComplete(locs[0])
	for _, l := range locs[1:] {
		e.mustComplete(l)
	}
	// One download at a time: while one is held open (unread), another gets 429.
	var obsURL string
	for _, it := range man.Output {
		if it.Type == "Observation" {
			obsURL = it.URL
		}
	}
	plain := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	// The slot is taken before the response headers go out, so it is held
	// once Get has returned them.
	held, err := plain.Get(obsURL)
	if err != nil {
		t.Fatal(err)
	}
	if r := e.do("GET", obsURL, nil); r.StatusCode != 429 || r.Header.Get("Retry-After") == "" {
		t.Fatalf("second concurrent download: %d", r.StatusCode)
	}
	io.Copy(io.Discard, held.Body)
	held.Body.Close()
	// The handler gives the slot back as it returns, just after the last byte.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		r := e.do("GET", obsURL, nil)
		if r.StatusCode == 200 {
			break
		}
		if r.StatusCode != 429 || time.Now().After(deadline) {
			t.Fatalf("download after the first ended: %d", r.StatusCode)
		}
	}
	body := e.do("GET", strings.TrimSuffix(e.base, "/4_0_0")+"/metrics", nil)
	text := string(body.body)
	for _, want := range []string{
		`kiln_export_jobs{state="completed"} 3`,
		`kiln_export_resources_total{type="Patient"} 3`,
		`kiln_export_resources_total{type="Observation"} 60000`,
		`kiln_export_units_total{event="finished"}`,
		`kiln_http_requests_total{code="202",route="GET /4_0_0/$export"} 3`,
		`kiln_http_requests_total{code="429",route="GET /4_0_0/$export"} 1`,
		`kiln_export_duration_seconds_count 3`,
		`kiln_export_queue_depth 0`,
		`kiln_outbox_backlog 0`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}
