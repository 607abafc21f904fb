package kiln

import "context"

// Message is an event waiting in the outbox until the broker has it.
type Message struct {
	Seq     int64             `json:"-"`
	Topic   string            `json:"topic"`
	Key     string            `json:"key"`
	Value   []byte            `json:"value"`
	Headers map[string]string `json:"headers,omitempty"`
}

// Events makes the outbox messages for a change. A store given an Events
// writes the messages in the same transaction as the change itself, so an
// event exists exactly when its change does, whatever the broker is doing.
type Events interface {
	// JobChanged is called when a job is created (old is nil) and whenever its state changes.
	JobChanged(old, new *Job) []Message
	// ResourcesWritten is called with the writes of one transaction that changed something.
	ResourcesWritten(res []WriteResult) []Message
}

// Outbox is the store side of event delivery.
type Outbox interface {
	// PendingMessages returns up to limit messages, oldest first.
	PendingMessages(ctx context.Context, limit int) ([]Message, error)
	// DeleteMessages removes delivered messages.
	DeleteMessages(ctx context.Context, seqs []int64) error
	// OutboxSize counts undelivered messages.
	OutboxSize(ctx context.Context) (int, error)
}
