package kafka

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/kiln-fhir/kiln"
)

// Config says how to reach the brokers.
type Config struct {
	Brokers  []string
	ClientID string
	// TLS turns on TLS; TLSCAFile, if set, is the CA bundle to trust.
	TLS       bool
	TLSCAFile string
	// SASL is "", "plain", "scram-sha-256" or "scram-sha-512".
	SASL         string
	SASLUser     string
	SASLPassword string
	// DeliveryTimeout bounds one attempt to deliver a batch (default 10 s).
	DeliveryTimeout time.Duration
}

// NewClient returns a franz-go producer for cfg. It does not connect yet.
func NewClient(cfg Config) (*kgo.Client, error) {
	if len(cfg.Brokers) == 0 {
		return nil, fmt.Errorf("kafka: no brokers")
	}
	if cfg.DeliveryTimeout <= 0 {
		cfg.DeliveryTimeout = 10 * time.Second
	}
	opts := []kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.RecordDeliveryTimeout(cfg.DeliveryTimeout),
		kgo.ProducerLinger(0),
	}
	if cfg.ClientID != "" {
		opts = append(opts, kgo.ClientID(cfg.ClientID))
	}
	if cfg.TLS {
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if cfg.TLSCAFile != "" {
			pem, err := os.ReadFile(cfg.TLSCAFile)
			if err != nil {
				return nil, fmt.Errorf("kafka: read CA file: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("kafka: no certificates in %s", cfg.TLSCAFile)
			}
		}
		opts = append(opts, kgo.DialTLSConfig(tc))
	}
	switch cfg.SASL {
	case "":
	case "plain":
		opts = append(opts, kgo.SASL(plain.Auth{User: cfg.SASLUser, Pass: cfg.SASLPassword}.AsMechanism()))
	case "scram-sha-256":
		opts = append(opts, kgo.SASL(scram.Auth{User: cfg.SASLUser, Pass: cfg.SASLPassword}.AsSha256Mechanism()))
	case "scram-sha-512":
		opts = append(opts, kgo.SASL(scram.Auth{User: cfg.SASLUser, Pass: cfg.SASLPassword}.AsSha512Mechanism()))
	default:
		return nil, fmt.Errorf("kafka: SASL mechanism %q: use plain, scram-sha-256 or scram-sha-512", cfg.SASL)
	}
	return kgo.NewClient(opts...)
}

// Relay moves outbox messages to the brokers in order. A message is deleted
// from the outbox only after the broker acknowledged it; a failed batch is
// retried with exponential backoff, so delivery is at least once and a
// consumer drops duplicates by the CloudEvent id.
type Relay struct {
	Outbox kiln.Outbox
	Client *kgo.Client
	Logger *slog.Logger
	// Batch is the number of messages sent at once (default 100).
	Batch int
	// Poll is how often an empty outbox is looked at again (default 200 ms).
	Poll time.Duration
	// MaxBackoff caps the wait between failed attempts (default 30 s).
	MaxBackoff time.Duration
}

// Run delivers until ctx ends.
func (r *Relay) Run(ctx context.Context) error {
	if r.Batch <= 0 {
		r.Batch = 100
	}
	if r.Poll <= 0 {
		r.Poll = 200 * time.Millisecond
	}
	if r.MaxBackoff <= 0 {
		r.MaxBackoff = 30 * time.Second
	}
	log := r.Logger
	if log == nil {
		log = slog.Default()
	}
	backoff := time.Duration(0)
	for {
		wait := r.Poll
		n, err := r.deliver(ctx)
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil:
			backoff = min(max(2*backoff, 250*time.Millisecond), r.MaxBackoff)
			wait = backoff
			log.Warn("event delivery failed; will retry", "err", err, "retry_in", backoff.String())
		case n > 0:
			backoff, wait = 0, 0
		default:
			backoff = 0
		}
		if wait > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
		}
	}
}

// deliver sends one batch and deletes what the broker acknowledged.
func (r *Relay) deliver(ctx context.Context) (int, error) {
	msgs, err := r.Outbox.PendingMessages(ctx, r.Batch)
	if err != nil || len(msgs) == 0 {
		return 0, err
	}
	recs := make([]*kgo.Record, len(msgs))
	for i, m := range msgs {
		rec := &kgo.Record{Topic: m.Topic, Key: []byte(m.Key), Value: m.Value}
		for k, v := range m.Headers {
			rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: k, Value: []byte(v)})
		}
		recs[i] = rec
	}
	// Results come back in completion order; match them to the records.
	errs := make(map[*kgo.Record]error, len(recs))
	for _, res := range r.Client.ProduceSync(ctx, recs...) {
		errs[res.Record] = res.Err
	}
	// Acknowledge the longest prefix that was delivered; the rest is sent again.
	var acked []int64
	var firstErr error
	for i, rec := range recs {
		if err := errs[rec]; err != nil {
			firstErr = err
			break
		}
		acked = append(acked, msgs[i].Seq)
	}
	n := len(acked)
	if n > 0 {
		if err := r.Outbox.DeleteMessages(context.WithoutCancel(ctx), acked); err != nil {
			return n, err
		}
	}
	if firstErr != nil {
		return n, fmt.Errorf("produce: %w", firstErr)
	}
	return n, nil
}
