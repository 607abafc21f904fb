// Package kafka publishes Kiln's events to Kafka with franz-go: bulk export
// status changes as Helix's CloudEvents, and optional resource-change events.
// Events come from the store's outbox, written in the same transaction as the
// change, and a Relay delivers them in order, at least once.
package kafka

import (
	"encoding/json"
	"time"

	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// Event types, as Helix names them.
const (
	ExportInitiated     = "ExportInitiated"
	ExportStatusUpdated = "ExportStatusUpdated"
	ExportCompleted     = "ExportCompleted"
)

// CloudEvent is a structured-mode CloudEvents 1.0 JSON value.
type CloudEvent struct {
	SpecVersion     string `json:"specversion"`
	ID              string `json:"id"`
	Source          string `json:"source"`
	Type            string `json:"type"`
	Time            string `json:"time"`
	DataContentType string `json:"datacontenttype"`
	Data            any    `json:"data"`
}

// ExportData is the data of an export event.
type ExportData struct {
	ExportJobID     string `json:"exportJobId"`
	TransactionTime string `json:"transactionTime"`
	Request         string `json:"request"`
	Status          string `json:"status"`
}

// ResourceData is the data of a resource-change event.
type ResourceData struct {
	ResourceType string `json:"resourceType"`
	ID           string `json:"id"`
	VersionID    string `json:"versionId"`
	LastUpdated  string `json:"lastUpdated"`
	// Resource is the new version; absent for a deletion.
	Resource json.RawMessage `json:"resource,omitempty"`
}

// Events implements kiln.Events.
type Events struct {
	// Topic receives export events (fhir.bulk_export.events).
	Topic string
	// ResourceTopic, if set, receives change events of ResourceTypes.
	ResourceTopic string
	ResourceTypes map[string]bool
	// Source is the CloudEvents source, e.g. the server's base URL.
	Source string
	Now    func() time.Time
}

var headers = map[string]string{"version": "R4"}

func (e *Events) now() time.Time {
	if e.Now != nil {
		return e.Now()
	}
	return time.Now()
}

func (e *Events) encode(typ string, data any) []byte {
	b, _ := json.Marshal(CloudEvent{
		SpecVersion: "1.0", ID: uuid.NewString(), Source: e.Source, Type: typ,
		Time: fhir.FormatInstant(e.now()), DataContentType: "application/json", Data: data,
	})
	return b
}

// JobChanged implements kiln.Events. accepted → ExportInitiated, in-progress →
// ExportStatusUpdated, completed or entered-in-error → ExportCompleted (with
// that status, as Helix does), cancelled → ExportCompleted with status
// "cancelled" (Kiln's addition: Helix has no cancel).
func (e *Events) JobChanged(old, new *kiln.Job) []kiln.Message {
	if e.Topic == "" {
		return nil
	}
	var typ string
	switch new.State {
	case kiln.JobAccepted:
		typ = ExportInitiated
	case kiln.JobInProgress:
		typ = ExportStatusUpdated
	case kiln.JobCompleted, kiln.JobFailed, kiln.JobCancelled:
		typ = ExportCompleted
	default:
		return nil
	}
	data := ExportData{ExportJobID: new.ID, TransactionTime: fhir.FormatInstant(new.TransactionTime), Request: new.Request.RequestURL, Status: string(new.State)}
	return []kiln.Message{{Topic: e.Topic, Key: new.ID, Value: e.encode(typ, data), Headers: headers}}
}

// ResourcesWritten implements kiln.Events: ResourceCreated, ResourceUpdated or
// ResourceDeleted for the chosen types, keyed by Type/id.
func (e *Events) ResourcesWritten(res []kiln.WriteResult) []kiln.Message {
	if e.ResourceTopic == "" {
		return nil
	}
	var out []kiln.Message
	for _, r := range res {
		if !e.ResourceTypes[r.Type] && !e.ResourceTypes["*"] {
			continue
		}
		typ := "ResourceUpdated"
		switch {
		case r.Deleted:
			typ = "ResourceDeleted"
		case r.Created:
			typ = "ResourceCreated"
		}
		data := ResourceData{ResourceType: r.Type, ID: r.ID, VersionID: itoa(r.Version), LastUpdated: fhir.FormatInstant(r.LastUpdated)}
		if !r.Deleted {
			data.Resource = r.Body
		}
		out = append(out, kiln.Message{Topic: e.ResourceTopic, Key: r.Type + "/" + r.ID, Value: e.encode(typ, data), Headers: headers})
	}
	return out
}

func itoa(v int64) string {
	b, _ := json.Marshal(v)
	return string(b)
}

var _ kiln.Events = (*Events)(nil)
