package kiln

import (
	"context"
	"time"
)

// Client is a SMART Backend Services client registered with Kiln.
type Client struct {
	ID string `json:"id"`
	// JWKS (inline) or JWKSURL holds the client's public keys.
	JWKS    []byte `json:"jwks,omitempty"`
	JWKSURL string `json:"jwksUrl,omitempty"`
	// Scope lists the scopes the client may be granted, space-separated.
	Scope   string    `json:"scope"`
	Created time.Time `json:"created"`
}

// ClientStore keeps registered clients.
type ClientStore interface {
	PutClient(ctx context.Context, c *Client) error
	// GetClient returns ENOTFOUND for an unknown id.
	GetClient(ctx context.Context, id string) (*Client, error)
	Clients(ctx context.Context) ([]*Client, error)
	DeleteClient(ctx context.Context, id string) error
	// UseAssertion records the key of a client assertion (client id and jti)
	// until expires, and reports false when it was recorded before: a replay.
	// Kept in the store, so that every API server sharing it refuses the replay.
	UseAssertion(ctx context.Context, key string, expires time.Time) (bool, error)
}
