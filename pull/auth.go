package pull

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"
)

// TokenSource gives the bearer token for a request ("" for none).
type TokenSource interface {
	Token(ctx context.Context) (string, error)
}

// StaticToken is a fixed bearer token.
type StaticToken string

// Token implements TokenSource.
func (s StaticToken) Token(context.Context) (string, error) { return string(s), nil }

// BackendServices gets tokens with SMART Backend Services: a client assertion
// signed with the client's key, exchanged at the token endpoint, renewed
// before it expires (long downloads outlive one 5-minute token).
type BackendServices struct {
	ClientID string
	// Key signs assertions: *rsa.PrivateKey (RS384) or *ecdsa.PrivateKey (ES384).
	Key      any
	KeyID    string
	TokenURL string
	Scope    string
	HTTP     *http.Client

	mu      sync.Mutex
	token   string
	expires time.Time
}

// Token implements TokenSource.
func (b *BackendServices) Token(ctx context.Context) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.token != "" && time.Until(b.expires) > 30*time.Second {
		return b.token, nil
	}
	method := jwt.SigningMethod(jwt.SigningMethodRS384)
	if _, ok := b.Key.(*ecdsa.PrivateKey); ok {
		method = jwt.SigningMethodES384
	}
	jti := make([]byte, 16)
	rand.Read(jti)
	t := jwt.NewWithClaims(method, jwt.MapClaims{
		"iss": b.ClientID, "sub": b.ClientID, "aud": b.TokenURL,
		"exp": time.Now().Add(4 * time.Minute).Unix(), "jti": hex.EncodeToString(jti),
	})
	t.Header["kid"] = b.KeyID
	assertion, err := t.SignedString(b.Key)
	if err != nil {
		return "", fmt.Errorf("sign client assertion: %w", err)
	}
	form := url.Values{
		"grant_type":            {"client_credentials"},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
		"client_assertion":      {assertion},
	}
	if b.Scope != "" {
		form.Set("scope", b.Scope)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, b.TokenURL, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	client := b.HTTP
	if client == nil {
		client = http.DefaultClient
	}
	res, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("token request: %w", err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	if res.StatusCode != http.StatusOK {
		return "", fmt.Errorf("token endpoint answered %s: %s", res.Status, strings.TrimSpace(string(body)))
	}
	var tr struct {
		AccessToken string `json:"access_token"`
		ExpiresIn   int    `json:"expires_in"`
	}
	if err := json.Unmarshal(body, &tr); err != nil || tr.AccessToken == "" {
		return "", fmt.Errorf("token endpoint gave no access_token: %s", body)
	}
	if tr.ExpiresIn <= 0 {
		tr.ExpiresIn = 300
	}
	b.token, b.expires = tr.AccessToken, time.Now().Add(time.Duration(tr.ExpiresIn)*time.Second)
	return b.token, nil
}

// LoadKey reads a private key from a JWK (JSON) or PEM file, and its key id
// (the JWK's kid; for PEM, its RFC 7638 thumbprint).
func LoadKey(path string) (any, string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, "", err
	}
	if strings.HasPrefix(strings.TrimSpace(string(b)), "{") {
		var k jose.JSONWebKey
		if err := k.UnmarshalJSON(b); err != nil {
			return nil, "", fmt.Errorf("%s: not a JWK: %w", path, err)
		}
		if k.IsPublic() {
			return nil, "", fmt.Errorf("%s holds a public key; the private key is needed", path)
		}
		return k.Key, k.KeyID, nil
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, "", fmt.Errorf("%s is neither a JWK nor PEM", path)
	}
	if k, err := x509.ParsePKCS8PrivateKey(blk.Bytes); err == nil {
		return k, thumbprint(k), nil
	}
	if k, err := x509.ParseECPrivateKey(blk.Bytes); err == nil {
		return k, thumbprint(k), nil
	}
	if k, err := x509.ParsePKCS1PrivateKey(blk.Bytes); err == nil {
		return k, thumbprint(k), nil
	}
	return nil, "", errors.New(path + ": unsupported private key")
}

// DiscoverTokenURL reads token_endpoint from the server's SMART configuration.
func DiscoverTokenURL(ctx context.Context, client *http.Client, server string) (string, error) {
	root := strings.TrimSuffix(server, "/")
	for _, u := range []string{root + "/.well-known/smart-configuration", rootOf(root) + "/.well-known/smart-configuration"} {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		req.Header.Set("Accept", "application/json")
		res, err := client.Do(req)
		if err != nil {
			continue
		}
		var cfg struct {
			TokenEndpoint string `json:"token_endpoint"`
		}
		err = json.NewDecoder(res.Body).Decode(&cfg)
		res.Body.Close()
		if res.StatusCode == http.StatusOK && err == nil && cfg.TokenEndpoint != "" {
			return cfg.TokenEndpoint, nil
		}
	}
	return "", fmt.Errorf("no token_endpoint in %s/.well-known/smart-configuration: give --token-url", root)
}

// thumbprint is the RFC 7638 JWK thumbprint (SHA-256, base64url) of the
// key's public half: the kid a PEM key gets when --key-id is not given, the
// same value a JWKS built from that key would carry.
func thumbprint(k any) string {
	s, ok := k.(crypto.Signer)
	if !ok {
		return ""
	}
	b, err := (&jose.JSONWebKey{Key: s.Public()}).Thumbprint(crypto.SHA256)
	if err != nil {
		return ""
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

func rootOf(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return u
	}
	return p.Scheme + "://" + p.Host
}

// DefaultScope picks the scope to ask for when the user gives none, from
// the server's SMART configuration: system/*.rs when it speaks only SMART v2
// (permission-v2 without permission-v1, or system/*.rs but not
// system/*.read in scopes_supported), else system/*.read. Kiln's own access/
// scopes are never added unasked: other servers refuse them (invalid_scope).
func DefaultScope(ctx context.Context, client *http.Client, server string) string {
	root := strings.TrimSuffix(server, "/")
	for _, u := range []string{root + "/.well-known/smart-configuration", rootOf(root) + "/.well-known/smart-configuration"} {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		req.Header.Set("Accept", "application/json")
		res, err := client.Do(req)
		if err != nil {
			continue
		}
		var cfg struct {
			Scopes       []string `json:"scopes_supported"`
			Capabilities []string `json:"capabilities"`
		}
		err = json.NewDecoder(res.Body).Decode(&cfg)
		res.Body.Close()
		if res.StatusCode != http.StatusOK || err != nil {
			continue
		}
		has := func(list []string, v string) bool {
			for _, x := range list {
				if x == v {
					return true
				}
			}
			return false
		}
		if has(cfg.Capabilities, "permission-v2") && !has(cfg.Capabilities, "permission-v1") ||
			has(cfg.Scopes, "system/*.rs") && !has(cfg.Scopes, "system/*.read") {
			return "system/*.rs"
		}
		return "system/*.read"
	}
	return "system/*.read"
}
