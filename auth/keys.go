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
// names an unknown kid, but not more often than every minInterval.
type remoteKeys struct {
	url         string
	client      *http.Client
	minInterval time.Duration
	now         func() time.Time // the clock of the interval (tests pin it)

	mu      sync.Mutex
	set     *jose.JSONWebKeySet
	fetched time.Time
}

func newRemoteKeys(url string) *remoteKeys {
	return &remoteKeys{url: url, client: &http.Client{Timeout: 10 * time.Second}, minInterval: 30 * time.Second, now: time.Now}
}

// key returns the key with kid, refreshing the set at most once per interval.
func (r *remoteKeys) key(ctx context.Context, kid string) (*jose.JSONWebKey, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.set != nil {
		if ks := r.set.Key(kid); len(ks) > 0 {
			return &ks[0], nil
		}
	}
	if r.set != nil && r.now().Sub(r.fetched) < r.minInterval {
		return nil, fmt.Errorf("no key %q in the JWKS at %s", kid, r.url)
	}
	set, err := fetchJWKS(ctx, r.client, r.url)
	r.fetched = r.now()
	if err != nil {
		return nil, err
	}
	r.set = set
	if ks := set.Key(kid); len(ks) > 0 {
		return &ks[0], nil
	}
	return nil, fmt.Errorf("no key %q in the JWKS at %s", kid, r.url)
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
