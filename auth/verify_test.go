package auth

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"
)

// TestJWKSURL: keys are fetched from the URL, cached, fetched again for an
// unknown kid — but not more than once per interval.
func TestJWKSURL(t *testing.T) {
	k1, _ := rsa.GenerateKey(rand.Reader, 2048)
	k2, _ := rsa.GenerateKey(rand.Reader, 2048)
	var keys atomic.Value
	keys.Store([]jose.JSONWebKey{{Key: k1.Public(), KeyID: "one", Algorithm: "RS256"}})
	var fetches atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: keys.Load().([]jose.JSONWebKey)})
	}))
	defer srv.Close()
	own, _ := LoadOrCreateKey(filepath.Join(t.TempDir(), "k.pem"))
	v, err := NewVerifier(Config{Issuer: "https://kiln.test", Key: own, JWKSURL: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	v.remote.minInterval = time.Minute
	clock := time.Unix(1_800_000_000, 0)
	v.remote.now = func() time.Time { return clock }
	sign := func(k *rsa.PrivateKey, kid string) string {
		tk := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{"iss": "https://idp", "sub": "u", "aud": "https://kiln.test", "exp": time.Now().Add(time.Minute).Unix()})
		tk.Header["kid"] = kid
		s, _ := tk.SignedString(k)
		return s
	}
	ctx := context.Background()
	for range 3 {
		if _, err := v.Verify(ctx, sign(k1, "one")); err != nil {
			t.Fatal(err)
		}
	}
	if fetches.Load() != 1 {
		t.Fatalf("%d fetches for one key, want 1 (cached)", fetches.Load())
	}
	// A rotated key: unknown at first, fetched on demand.
	keys.Store([]jose.JSONWebKey{{Key: k1.Public(), KeyID: "one"}, {Key: k2.Public(), KeyID: "two"}})
	clock = clock.Add(time.Minute) // the refetch interval has passed
	if _, err := v.Verify(ctx, sign(k2, "two")); err != nil {
		t.Fatalf("rotated key: %v", err)
	}
	// Unknown kids do not hammer the JWKS endpoint.
	n := fetches.Load()
	for range 5 {
		if _, err := v.Verify(ctx, sign(k2, "three")); err == nil || !strings.Contains(err.Error(), "unknown key") && !strings.Contains(err.Error(), "no key") {
			t.Fatalf("unknown kid: %v", err)
		}
	}
	if fetches.Load()-n > 1 {
		t.Fatalf("%d fetches for 5 unknown-kid tokens within the interval", fetches.Load()-n)
	}
}

// TestMaxTokenLifetime: Kiln neither mints nor accepts its own tokens living
// longer than MaxTokenLifetime.
func TestMaxTokenLifetime(t *testing.T) {
	own, _ := LoadOrCreateKey(filepath.Join(t.TempDir(), "k.pem"))
	v, err := NewVerifier(Config{Issuer: "https://kiln.test", Key: own})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.Mint("u", "system/*.read", 48*time.Hour, nil); err == nil {
		t.Error("minted a 48 h token")
	}
	now := time.Now()
	tk := jwt.NewWithClaims(jwt.SigningMethodES256, jwt.MapClaims{"iss": "https://kiln.test", "aud": "https://kiln.test", "sub": "u", "scope": "system/*.read", "exp": now.Add(30 * 24 * time.Hour).Unix()})
	tk.Header["kid"] = own.KeyID
	s, err := tk.SignedString(own.Private)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(context.Background(), s); err == nil || !strings.Contains(err.Error(), "lifetime") {
		t.Errorf("30-day own token: %v, want a lifetime refusal", err)
	}
	ok, _ := v.Mint("u", "system/*.read", time.Minute, nil)
	if _, err := v.Verify(context.Background(), ok); err != nil {
		t.Errorf("1-minute token: %v", err)
	}
}
