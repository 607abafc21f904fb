package kafka_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/httpapi"
	"github.com/kiln-fhir/kiln/kafka"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/sqlite"
)

const topic = "fhir.bulk_export.events"

type rig struct {
	db   *sqlite.DB
	base string
}

// newRig runs a Kiln server with the Kafka relay pointed at brokers.
func newRig(t *testing.T, brokers []string, resourceTypes ...string) *rig {
	t.Helper()
	dir := t.TempDir()
	db, err := sqlite.Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	rt := map[string]bool{}
	for _, r := range resourceTypes {
		rt[r] = true
	}
	ev := &kafka.Events{Topic: topic, Source: "urn:kiln:test"}
	if len(rt) > 0 {
		ev.ResourceTopic, ev.ResourceTypes = "business.events", rt
	}
	db.SetEvents(ev)
	sink, _ := localfs.New(filepath.Join(dir, "exports"))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	svc := export.New(db, db, sink, export.Config{Logger: log})
	srv := httptest.NewServer(httpapi.New(db, svc, httpapi.Config{Logger: log, PollBurst: -1}, nil))
	client, err := kafka.NewClient(kafka.Config{Brokers: brokers, DeliveryTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	relay := &kafka.Relay{Outbox: db, Client: client, Logger: log, Poll: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); svc.Run(ctx) }()
	go func() { defer wg.Done(); relay.Run(ctx) }()
	t.Cleanup(func() {
		srv.Close()
		cancel()
		wg.Wait()
		client.Close()
		db.Close()
	})
	return &rig{db: db, base: srv.URL + "/4_0_0"}
}

func (r *rig) put(t *testing.T, body string) {
	t.Helper()
	p, err := fhir.Parse([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.db.Write(context.Background(), []kiln.Write{fhir.Prepare(p, p.ID, fhir.Options{})}); err != nil {
		t.Fatal(err)
	}
}

// export kicks off a system export over HTTP and waits for it to finish.
func (r *rig) export(t *testing.T) string {
	t.Helper()
	res, err := http.Get(r.base + "/$export")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 202 {
		t.Fatalf("kick-off: %d", res.StatusCode)
	}
	loc := res.Header.Get("Content-Location")
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		res, err := http.Get(loc)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode == 200 {
			return loc[len(loc)-36:]
		}
	}
	t.Fatal("export did not finish")
	return ""
}

// consume reads n records from topic.
func consume(t *testing.T, brokers []string, topic string, n int) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out []*kgo.Record
	for len(out) < n {
		f := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("got %d of %d records", len(out), n)
		}
		f.EachRecord(func(r *kgo.Record) { out = append(out, r) })
	}
	return out
}

func checkExportEvents(t *testing.T, recs []*kgo.Record, job string, want [][2]string) {
	t.Helper()
	if len(recs) != len(want) {
		t.Fatalf("%d events, want %d", len(recs), len(want))
	}
	seen := map[string]bool{}
	for i, rec := range recs {
		var ev struct {
			kafka.CloudEvent
			Data kafka.ExportData `json:"data"`
		}
		if err := json.Unmarshal(rec.Value, &ev); err != nil {
			t.Fatalf("event %d: %v: %s", i, err, rec.Value)
		}
		if string(rec.Key) != job {
			t.Errorf("event %d key %q, want the job id", i, rec.Key)
		}
		if len(rec.Headers) != 1 || rec.Headers[0].Key != "version" || string(rec.Headers[0].Value) != "R4" {
			t.Errorf("event %d headers %v", i, rec.Headers)
		}
		if ev.SpecVersion != "1.0" || ev.ID == "" || seen[ev.ID] || ev.Source != "urn:kiln:test" || ev.DataContentType != "application/json" {
			t.Errorf("event %d envelope %+v", i, ev.CloudEvent)
		}
		seen[ev.ID] = true
		if _, err := time.Parse(time.RFC3339, ev.Time); err != nil {
			t.Errorf("event %d time %q", i, ev.Time)
		}
		if ev.Type != want[i][0] || ev.Data.Status != want[i][1] || ev.Data.ExportJobID != job || ev.Data.TransactionTime == "" || ev.Data.Request == "" {
			t.Errorf("event %d: %s %+v, want %v", i, ev.Type, ev.Data, want[i])
		}
	}
}

var fullSequence = [][2]string{{"ExportInitiated", "accepted"}, {"ExportStatusUpdated", "in-progress"}, {"ExportCompleted", "completed"}}

func TestExportEvents(t *testing.T) {
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, topic, "business.events"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := newRig(t, c.ListenAddrs(), "Patient")
	r.put(t, `{"resourceType":"Patient","id":"p1"}`)
	job := r.export(t)
	checkExportEvents(t, consume(t, c.ListenAddrs(), topic, 3), job, fullSequence)
	rec := consume(t, c.ListenAddrs(), "business.events", 1)[0]
	var ev struct {
		Type string
		Data kafka.ResourceData
	}
	json.Unmarshal(rec.Value, &ev)
	if ev.Type != "ResourceCreated" || ev.Data.ID != "p1" || ev.Data.VersionID != "1" || string(rec.Key) != "Patient/p1" {
		t.Fatalf("resource event %s: %+v", rec.Key, ev)
	}
	deadline := time.Now().Add(10 * time.Second)
	for n, _ := r.db.OutboxSize(context.Background()); n > 0; n, _ = r.db.OutboxSize(context.Background()) {
		if time.Now().After(deadline) {
			t.Fatalf("%d messages stay in the outbox after delivery", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestBrokerOutage: with the broker down, kick-off and export succeed; when
// it comes back, every event is delivered, in order.
func TestBrokerOutage(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	brokers := []string{fmt.Sprintf("127.0.0.1:%d", port)}
	r := newRig(t, brokers)
	r.put(t, `{"resourceType":"Patient","id":"p1"}`)
	job1 := r.export(t)
	job2 := r.export(t)
	if n, _ := r.db.OutboxSize(context.Background()); n != 6 {
		t.Fatalf("outbox holds %d messages while the broker is down, want 6", n)
	}
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.Ports(port), kfake.SeedTopics(1, topic))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	recs := consume(t, brokers, topic, 6)
	checkExportEvents(t, recs[:3], job1, fullSequence)
	checkExportEvents(t, recs[3:], job2, fullSequence)
}
