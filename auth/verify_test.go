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
		if _, err := v.Verify(ctx, sign(k2, "three")); err == nil || !strings.Contains(err.Error(), "no trusted key") {
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

// TestJWKSFetchHardening (issue 17): a JWKS URL that redirects to another
// host is not followed; failures are cached with a doubling backoff rather
// than fetched again for every token; the caller's error names neither the
// URL nor the failure; and a token whose key is cached never waits for a
// fetch another token started.
func TestJWKSFetchHardening(t *testing.T) {
	k1, _ := rsa.GenerateKey(rand.Reader, 2048)
	good, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: k1.Public(), KeyID: "one", Algorithm: "RS256"}}})
	sign := func(kid string) string {
		tk := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{"iss": "https://idp", "sub": "u", "aud": "https://kiln.test", "exp": time.Now().Add(time.Minute).Unix()})
		tk.Header["kid"] = kid
		s, _ := tk.SignedString(k1)
		return s
	}
	own, _ := LoadOrCreateKey(filepath.Join(t.TempDir(), "k.pem"))
	verifier := func(url string) (*Verifier, *time.Time) {
		v, err := NewVerifier(Config{Issuer: "https://kiln.test", Key: own, JWKSURL: url})
		if err != nil {
			t.Fatal(err)
		}
		clock := time.Unix(1_800_000_000, 0)
		v.remote.now = func() time.Time { return clock }
		return v, &clock
	}
	ctx := context.Background()

	t.Run("no redirect to another host", func(t *testing.T) {
		var elsewhere atomic.Int32
		other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { elsewhere.Add(1); w.Write(good) }))
		defer other.Close()
		redir := httptest.NewServer(http.RedirectHandler(other.URL+"/jwks", http.StatusFound))
		defer redir.Close()
		v, _ := verifier(redir.URL)
		if _, err := v.Verify(ctx, sign("one")); err == nil {
			t.Fatal("a key set from a redirect to another host verified a token")
		}
		if elsewhere.Load() != 0 {
			t.Fatal("the redirect to another host was followed")
		}
		if err := v.KeySetError(); err == nil || !strings.Contains(err.Error(), "another host") {
			t.Errorf("the operator's error: %v", err)
		}
	})

	t.Run("failures back off and say nothing to the caller", func(t *testing.T) {
		var fetches atomic.Int32
		failing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fetches.Add(1)
			http.Error(w, "database on fire", http.StatusInternalServerError)
		}))
		defer failing.Close()
		v, clock := verifier(failing.URL)
		v.remote.minInterval = time.Minute
		verifyAt := func(after time.Duration) error {
			*clock = clock.Add(after)
			_, err := v.Verify(ctx, sign("one"))
			return err
		}
		for range 5 {
			err := verifyAt(0)
			if err == nil {
				t.Fatal("verified with no key set")
			}
			if strings.Contains(err.Error(), failing.URL) || strings.Contains(err.Error(), "500") || strings.Contains(err.Error(), "fire") {
				t.Fatalf("the caller learns about the key server: %v", err)
			}
		}
		if n := fetches.Load(); n != 1 {
			t.Fatalf("%d fetches for 5 tokens right after a failure, want 1", n)
		}
		verifyAt(time.Minute) // the interval has passed: a second try, which fails too
		if n := fetches.Load(); n != 2 {
			t.Fatalf("after the interval: %d fetches, want 2", n)
		}
		verifyAt(time.Minute) // the backoff has doubled: not yet
		if n := fetches.Load(); n != 2 {
			t.Fatalf("inside the doubled backoff: %d fetches, want 2", n)
		}
		verifyAt(time.Minute)
		if n := fetches.Load(); n != 3 {
			t.Fatalf("after the doubled backoff: %d fetches, want 3", n)
		}
	})

	t.Run("a cached key never waits for a fetch", func(t *testing.T) {
		arrived, release := make(chan struct{}), make(chan struct{})
		var calls atomic.Int32
		slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if calls.Add(1) == 2 {
				close(arrived)
				<-release // the second fetch hangs until the test lets it go
			}
			w.Write(good)
		}))
		defer slow.Close()
		defer close(release)
		v, clock := verifier(slow.URL)
		if _, err := v.Verify(ctx, sign("one")); err != nil {
			t.Fatal(err)
		}
		*clock = clock.Add(time.Hour)
		go v.Verify(ctx, sign("unknown")) // starts the hanging fetch
		<-arrived
		done := make(chan error, 1)
		go func() { _, err := v.Verify(ctx, sign("one")); done <- err }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("a token with a cached key waited for another token's fetch")
		}
	})
}
