package auth

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// SigningKey is Kiln's own key for the access tokens it issues.
type SigningKey struct {
	Private *ecdsa.PrivateKey
	KeyID   string
}

// LoadOrCreateKey reads an ECDSA P-256 key (PEM) from path, creating it
// (mode 0600) when missing. Several servers sharing a store must share this file.
func LoadOrCreateKey(path string) (*SigningKey, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("auth: generate signing key: %w", err)
		}
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			return nil, fmt.Errorf("auth: encode signing key: %w", err)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, fmt.Errorf("auth: key folder: %w", err)
		}
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, fmt.Errorf("auth: write signing key: %w", err)
		}
		return newSigningKey(k)
	}
	if err != nil {
		return nil, fmt.Errorf("auth: read signing key: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("auth: %s is not PEM", path)
	}
	k, err := x509.ParseECPrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("auth: parse signing key: %w", err)
	}
	return newSigningKey(k)
}

func newSigningKey(k *ecdsa.PrivateKey) (*SigningKey, error) {
	jwk := jose.JSONWebKey{Key: k.Public()}
	tp, err := jwk.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("auth: key thumbprint: %w", err)
	}
	return &SigningKey{Private: k, KeyID: base64.RawURLEncoding.EncodeToString(tp)}, nil
}

// JWKS is the public half, as a JSON Web Key Set.
func (k *SigningKey) JWKS() jose.JSONWebKeySet {
	return jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: k.Private.Public(), KeyID: k.KeyID, Algorithm: "ES256", Use: "sig"}}}
}

// ParseJWKS reads a JSON Web Key Set.
func ParseJWKS(b []byte) (*jose.JSONWebKeySet, error) {
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(b, &set); err != nil {
		return nil, fmt.Errorf("auth: JWKS: %w", err)
	}
	if len(set.Keys) == 0 {
		return nil, errors.New("auth: JWKS has no keys")
	}
	for _, k := range set.Keys {
		if !k.Valid() || !k.IsPublic() {
			return nil, fmt.Errorf("auth: JWKS key %q is not a valid public key", k.KeyID)
		}
		if err := StrongEnough(k.Key); err != nil {
			return nil, fmt.Errorf("auth: JWKS key %q: %w", k.KeyID, err)
		}
	}
	return &set, nil
}

// MinRSABits is the smallest RSA modulus Kiln trusts (NIST SP 800-57: 2048
// bits until 2030; the SMART Backend Services examples use 2048 or more).
const MinRSABits = 2048

// StrongEnough refuses public keys too weak to sign assertions or tokens:
// RSA below MinRSABits, and elliptic curves other than P-256, P-384, P-521.
// Every key Kiln accepts (client registration, JWKS files and URLs) passes
// through it.
func StrongEnough(key any) error {
	switch k := key.(type) {
	case *rsa.PublicKey:
		if n := k.N.BitLen(); n < MinRSABits {
			return fmt.Errorf("an RSA key of %d bits is too weak: at least %d are required", n, MinRSABits)
		}
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
		default:
			return fmt.Errorf("elliptic curve %s is not accepted: use P-256, P-384 or P-521", k.Curve.Params().Name)
		}
	default:
		return fmt.Errorf("key type %T is not accepted: use RSA (≥ %d bits) or EC (P-256, P-384, P-521)", key, MinRSABits)
	}
	return nil
}

// remoteKeys is a JWKS fetched from a URL: cached, fetched again when a token
// names an unknown kid, but not more often than every minInterval, and after
// failures with a backoff doubling up to maxBackoff. The lock is never held
// across the network: a token whose key is cached never waits for a fetch,
// and concurrent tokens with unknown kids share one fetch.
type remoteKeys struct {
	url         string
	client      *http.Client
	minInterval time.Duration
	maxBackoff  time.Duration
	now         func() time.Time // the clock of the interval (tests pin it)

	mu       sync.Mutex
	set      *jose.JSONWebKeySet
	fetched  time.Time     // when the last fetch ended
	wait     time.Duration // how long after it the next may start
	failures int
	lastErr  error         // the last fetch's failure, for the operator (never the caller)
	inflight chan struct{} // closed when the fetch under way ends
}

func newRemoteKeys(url string) *remoteKeys {
	client := &http.Client{Timeout: 10 * time.Second, CheckRedirect: sameHostRedirects}
	return &remoteKeys{url: url, client: client, minInterval: 30 * time.Second, maxBackoff: 10 * time.Minute, now: time.Now}
}

// sameHostRedirects follows at most 3 redirects, each on the JWKS URL's own
// scheme and host: a key set must not come from wherever a redirect points.
func sameHostRedirects(req *http.Request, via []*http.Request) error {
	if len(via) >= 3 {
		return errors.New("too many redirects")
	}
	if req.URL.Host != via[0].URL.Host || req.URL.Scheme != via[0].URL.Scheme {
		return fmt.Errorf("redirect to another host (%s) refused", req.URL.Host)
	}
	return nil
}

// errNoKey is what a caller learns when no key verifies its token: the
// reason (a fetch failure, an unknown kid) is for the server's log.
var errNoKey = errors.New("no trusted key matches the token's kid")

// key returns the key with kid, fetching the set when kid is unknown and the
// interval (or the backoff after failures) has passed.
func (r *remoteKeys) key(ctx context.Context, kid string) (*jose.JSONWebKey, error) {
	for {
		r.mu.Lock()
		if r.set != nil {
			if ks := r.set.Key(kid); len(ks) > 0 {
				r.mu.Unlock()
				return &ks[0], nil
			}
		}
		if ch := r.inflight; ch != nil {
			// Another token's fetch is under way: its result serves this one too.
			r.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		if !r.fetched.IsZero() && r.now().Sub(r.fetched) < r.wait {
			r.mu.Unlock()
			return nil, errNoKey
		}
		ch := make(chan struct{})
		r.inflight = ch
		r.mu.Unlock()

		set, err := fetchJWKS(context.WithoutCancel(ctx), r.client, r.url)
		r.mu.Lock()
		r.inflight, r.fetched = nil, r.now()
		if err != nil {
			r.failures++
			r.lastErr = err
			r.wait = min(r.minInterval<<min(r.failures-1, 16), max(r.maxBackoff, r.minInterval))
		} else {
			r.set, r.failures, r.lastErr, r.wait = set, 0, nil, r.minInterval
		}
		close(ch)
		var key *jose.JSONWebKey
		if r.set != nil {
			if ks := r.set.Key(kid); len(ks) > 0 {
				key = &ks[0]
			}
		}
		r.mu.Unlock()
		if key == nil {
			return nil, errNoKey
		}
		return key, nil
	}
}

// Err is the last JWKS fetch's failure (nil after a success).
func (r *remoteKeys) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastErr
}

func fetchJWKS(ctx context.Context, client *http.Client, url string) (*jose.JSONWebKeySet, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("auth: JWKS URL: %w", err)
	}
	res, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("auth: fetch JWKS: %w", err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("auth: fetch JWKS: %s", res.Status)
	}
	b, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("auth: fetch JWKS: %w", err)
	}
	return ParseJWKS(b)
}
