package kiln

import (
	"context"
	"encoding/json"
	"time"
)

// StoredView is a ViewDefinition the server keeps (SQL on FHIR v2's logical
// model: R4 has no such resource type, so views are not in the resource
// store, its history or its exports).
type StoredView struct {
	ID      string
	Version int64
	Updated time.Time
	// Body is the ViewDefinition as it was put (id and meta are the
	// server's, added when it is served).
	Body json.RawMessage
}

// ViewStore keeps ViewDefinitions by id.
type ViewStore interface {
	// PutView stores body as view id: version 1, or the next version of
	// the view there is.
	PutView(ctx context.Context, id string, body []byte) (*StoredView, error)
	// GetView returns ENOTFOUND for an unknown id.
	GetView(ctx context.Context, id string) (*StoredView, error)
	// Views lists every view by id.
	Views(ctx context.Context) ([]*StoredView, error)
	// DeleteView returns ENOTFOUND for an unknown id.
	DeleteView(ctx context.Context, id string) error
}

// SecretStore keeps random secrets the processes sharing a store must agree
// on (the key that makes search cursors opaque).
type SecretStore interface {
	// Secret returns the secret called name, made of size random bytes the
	// first time it is asked for; every later call, from any process, gets
	// the same bytes.
	Secret(ctx context.Context, name string, size int) ([]byte, error)
}
