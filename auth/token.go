package auth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"mime"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"

	"github.com/kiln-fhir/kiln"
)

const (
	assertionType = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
	// TokenLifetime is the lifetime of issued access tokens (SMART: at most 300 s).
	TokenLifetime = 5 * time.Minute
	// maxAssertionLife is how far in the future a client assertion's exp may be.
	maxAssertionLife = 5 * time.Minute
)

func newJTI() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// TokenServer is the SMART Backend Services token endpoint: client_credentials
// with a private_key_jwt assertion (RS384 or ES384).
type TokenServer struct {
	Verifier *Verifier
	Clients  kiln.ClientStore
	// URL is the token endpoint's own URL: the aud client assertions must name.
	URL string
	Now func() time.Time

	mu sync.Mutex
	// remote caches client JWKS fetched from URLs.
	remote map[string]*remoteKeys
}

type tokenError struct {
	status int
	code   string
	desc   string
}

func (e *tokenError) Error() string { return e.code + ": " + e.desc }

func tokenErr(status int, code, format string, args ...any) *tokenError {
	return &tokenError{status: status, code: code, desc: fmt.Sprintf(format, args...)}
}

// ServeHTTP answers token requests; errors follow RFC 6749 §5.2.
func (s *TokenServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	resp, err := s.issue(r)
	if err != nil {
		var te *tokenError
		if !errors.As(err, &te) {
			te = tokenErr(http.StatusInternalServerError, "server_error", "the token could not be issued")
		}
		w.Header().Set("Content-Type", "application/json")
		switch te.status {
		case http.StatusUnauthorized:
			w.Header().Set("WWW-Authenticate", `Bearer realm="kiln"`)
		case http.StatusMethodNotAllowed:
			w.Header().Set("Allow", http.MethodPost)
		}
		w.WriteHeader(te.status)
		json.NewEncoder(w).Encode(map[string]string{"error": te.code, "error_description": te.desc})
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(resp)
}

func (s *TokenServer) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

// issue checks a token request. Its errors follow RFC 6749 §5.2 and SMART
// Backend Services: a malformed request is 400 invalid_request, a client that
// cannot be authenticated (unknown, bad signature, wrong typ, replayed jti)
// is 401 invalid_client, scopes that cannot be granted 400 invalid_scope.
func (s *TokenServer) issue(r *http.Request) (map[string]any, error) {
	if r.Method != http.MethodPost {
		return nil, tokenErr(http.StatusMethodNotAllowed, "invalid_request", "the token endpoint takes POST, not %s", r.Method)
	}
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/x-www-form-urlencoded" {
		return nil, tokenErr(http.StatusBadRequest, "invalid_request", "the body must be application/x-www-form-urlencoded, not %q", r.Header.Get("Content-Type"))
	}
	r.Body = http.MaxBytesReader(nil, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		return nil, tokenErr(http.StatusBadRequest, "invalid_request", "the form body could not be read: %v", err)
	}
	for k, v := range r.PostForm {
		if len(v) > 1 {
			return nil, tokenErr(http.StatusBadRequest, "invalid_request", "parameter %s is given %d times (RFC 6749 §3.2: at most once)", k, len(v))
		}
	}
	switch gt := r.PostForm.Get("grant_type"); gt {
	case "client_credentials":
	case "":
		return nil, tokenErr(http.StatusBadRequest, "invalid_request", "grant_type is required (client_credentials)")
	default:
		return nil, tokenErr(http.StatusBadRequest, "unsupported_grant_type", "grant_type must be client_credentials, got %q", gt)
	}
	if at := r.PostForm.Get("client_assertion_type"); at != assertionType {
		return nil, tokenErr(http.StatusBadRequest, "invalid_request", "client_assertion_type must be %s, got %q", assertionType, at)
	}
	assertion := r.PostForm.Get("client_assertion")
	if assertion == "" {
		return nil, tokenErr(http.StatusBadRequest, "invalid_request", "client_assertion is required")
	}
	requested := r.PostForm.Get("scope")
	if strings.TrimSpace(requested) == "" {
		return nil, tokenErr(http.StatusBadRequest, "invalid_scope", "scope is required: name the scopes the token should carry, for example system/*.rs")
	}
	client, err := s.verifyAssertion(r.Context(), assertion)
	if err != nil {
		return nil, err
	}
	scope, dropped, err := Grant(client.Scope, requested)
	if err != nil {
		return nil, tokenErr(http.StatusBadRequest, "invalid_scope", "%v", err)
	}
	token, err := s.Verifier.Mint(client.ID, scope, TokenLifetime, map[string]any{"client_id": client.ID})
	if err != nil {
		return nil, err
	}
	if len(dropped) > 0 {
		slog.InfoContext(r.Context(), "token scopes dropped", "client", client.ID, "dropped", strings.Join(dropped, " "))
	}
	return map[string]any{"access_token": token, "token_type": "bearer", "expires_in": int(TokenLifetime.Seconds()), "scope": scope}, nil
}

func (s *TokenServer) verifyAssertion(ctx context.Context, assertion string) (*kiln.Client, error) {
	var claims jwt.RegisteredClaims
	unverified, _, err := jwt.NewParser().ParseUnverified(assertion, &claims)
	if err != nil {
		return nil, tokenErr(http.StatusUnauthorized, "invalid_client", "client_assertion is not a JWT: %v", err)
	}
	// RFC 7523 leaves typ optional; when sent it must say JWT.
	if typ, ok := unverified.Header["typ"]; ok {
		if t, _ := typ.(string); !strings.EqualFold(t, "JWT") {
			return nil, tokenErr(http.StatusUnauthorized, "invalid_client", "client_assertion typ header is %q, not JWT", typ)
		}
	}
	if claims.Issuer == "" || claims.Issuer != claims.Subject {
		return nil, tokenErr(http.StatusUnauthorized, "invalid_client", "client_assertion iss and sub must both be the client id")
	}
	client, err := s.Clients.GetClient(ctx, claims.Issuer)
	if err != nil {
		if kiln.ErrorCode(err) == kiln.ENOTFOUND {
			return nil, tokenErr(http.StatusUnauthorized, "invalid_client", "client %q is not registered", claims.Issuer)
		}
		return nil, err
	}
	kid, _ := unverified.Header["kid"].(string)
	if kid == "" {
		return nil, tokenErr(http.StatusUnauthorized, "invalid_client", "client_assertion has no kid header")
	}
	key, err := s.clientKey(ctx, client, kid)
	if err != nil {
		return nil, tokenErr(http.StatusUnauthorized, "invalid_client", "%v", err)
	}
	var checked jwt.RegisteredClaims
	_, err = jwt.ParseWithClaims(assertion, &checked, func(*jwt.Token) (any, error) { return key.Key, nil },
		jwt.WithValidMethods([]string{"RS384", "ES384"}),
		jwt.WithAudience(s.URL),
		jwt.WithExpirationRequired(),
		jwt.WithLeeway(30*time.Second),
		jwt.WithTimeFunc(s.now),
	)
	if err != nil {
		return nil, tokenErr(http.StatusUnauthorized, "invalid_client", "client_assertion rejected: %v", err)
	}
	if checked.ExpiresAt.Time.After(s.now().Add(maxAssertionLife + 30*time.Second)) {
		return nil, tokenErr(http.StatusUnauthorized, "invalid_client", "client_assertion exp is more than 5 minutes ahead")
	}
	if checked.ID == "" {
		return nil, tokenErr(http.StatusUnauthorized, "invalid_client", "client_assertion has no jti")
	}
	// Kept past exp by more than the leeway, so that no replay lands after
	// the record is gone but while the assertion still passes.
	used := sha256.Sum256([]byte(client.ID + "\x00" + checked.ID)) // one key per client and jti, any characters
	fresh, err := s.Clients.UseAssertion(ctx, hex.EncodeToString(used[:]), checked.ExpiresAt.Time.Add(time.Minute))
	if err != nil {
		return nil, fmt.Errorf("record client assertion: %w", err)
	}
	if !fresh {
		return nil, tokenErr(http.StatusUnauthorized, "invalid_client", "client_assertion jti was already used: sign a new assertion for each token request")
	}
	return client, nil
}

func (s *TokenServer) clientKey(ctx context.Context, c *kiln.Client, kid string) (*jose.JSONWebKey, error) {
	if len(c.JWKS) > 0 {
		set, err := ParseJWKS(c.JWKS)
		if err != nil {
			return nil, err
		}
		if ks := set.Key(kid); len(ks) > 0 {
			return &ks[0], nil
		}
		return nil, fmt.Errorf("client %s has no key %q", c.ID, kid)
	}
	if c.JWKSURL == "" {
		return nil, fmt.Errorf("client %s has no keys", c.ID)
	}
	s.mu.Lock()
	if s.remote == nil {
		s.remote = map[string]*remoteKeys{}
	}
	rk := s.remote[c.JWKSURL]
	if rk == nil {
		rk = newRemoteKeys(c.JWKSURL)
		s.remote[c.JWKSURL] = rk
	}
	s.mu.Unlock()
	return rk.key(ctx, kid)
}
