package auth

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// Config says which bearer tokens are trusted.
type Config struct {
	// Issuer is the iss of Kiln's own tokens (its base URL); Audience the aud
	// every token must carry (default: Issuer).
	Issuer   string
	Audience string
	// Key signs and verifies Kiln's own tokens.
	Key *SigningKey
	// Other issuers: tokens from them are accepted when signed by a key of
	// JWKSURL or JWKSFile (asymmetric), or by SecretFile's shared secret
	// (HS256, for development; refused whenever asymmetric keys are set).
	TrustedIssuers []string
	JWKSURL        string
	JWKSFile       string
	SecretFile     string
	// Algorithms allowed for other issuers' tokens (default RS256, RS384,
	// RS512, ES256, ES384, ES512, PS256; HS256 with a secret).
	Algorithms []string
	// Skew is the clock tolerance for exp, nbf and iat (default 60 s).
	Skew time.Duration
	// PrincipalClaim names the claim that identifies the principal (default sub).
	PrincipalClaim string
	// Tenancy says what a token without access/ scopes may read (default
	// kiln.TenancyNone: everything its resource scopes allow).
	Tenancy kiln.Tenancy
	Now     func() time.Time
}

// Verifier checks bearer tokens.
type Verifier struct {
	cfg    Config
	file   *jose.JSONWebKeySet
	remote *remoteKeys
	secret []byte
}

// NewVerifier prepares a Verifier.
func NewVerifier(cfg Config) (*Verifier, error) {
	if cfg.Key == nil || cfg.Issuer == "" {
		return nil, errors.New("auth: Kiln's signing key and issuer are required")
	}
	if cfg.Audience == "" {
		cfg.Audience = cfg.Issuer
	}
	if cfg.Skew <= 0 {
		cfg.Skew = 60 * time.Second
	}
	if cfg.PrincipalClaim == "" {
		cfg.PrincipalClaim = "sub"
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	t, err := kiln.ParseTenancy(string(cfg.Tenancy))
	if err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}
	cfg.Tenancy = t
	v := &Verifier{cfg: cfg}
	if cfg.JWKSFile != "" {
		b, err := os.ReadFile(cfg.JWKSFile)
		if err != nil {
			return nil, fmt.Errorf("auth: JWKS file: %w", err)
		}
		if v.file, err = ParseJWKS(b); err != nil {
			return nil, err
		}
	}
	if cfg.JWKSURL != "" {
		v.remote = newRemoteKeys(cfg.JWKSURL)
	}
	if cfg.SecretFile != "" {
		if v.file != nil || v.remote != nil {
			return nil, errors.New("auth: a shared secret cannot be combined with asymmetric keys (HMAC tokens would then verify against public keys' owners)")
		}
		b, err := os.ReadFile(cfg.SecretFile)
		if err != nil {
			return nil, fmt.Errorf("auth: secret file: %w", err)
		}
		v.secret = []byte(strings.TrimSpace(string(b)))
		if len(v.secret) < 32 {
			return nil, errors.New("auth: the shared secret must be at least 32 bytes")
		}
	}
	if len(cfg.Algorithms) == 0 {
		v.cfg.Algorithms = []string{"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256"}
		if v.secret != nil {
			v.cfg.Algorithms = []string{"HS256"}
		}
	}
	if slices.Contains(v.cfg.Algorithms, "none") {
		return nil, errors.New("auth: alg none is never allowed")
	}
	return v, nil
}

// Secret is the development shared secret, if one is configured.
func (v *Verifier) Secret() []byte { return v.secret }

func unauthorized(format string, args ...any) error {
	return kiln.Errorf(kiln.EUNAUTHORIZED, format, args...)
}

// Verify checks a bearer token and returns its principal. Every failure is an
// EUNAUTHORIZED error whose message says what was wrong.
func (v *Verifier) Verify(ctx context.Context, token string) (*Principal, error) {
	if token == "" {
		return nil, unauthorized("no bearer token: send Authorization: Bearer <token>")
	}
	parser := jwt.NewParser(jwt.WithoutClaimsValidation())
	var claims jwt.MapClaims
	unverified, _, err := parser.ParseUnverified(token, &claims)
	if err != nil {
		return nil, unauthorized("malformed bearer token: %v", err)
	}
	// RFC 7515 §4.1.11: a recipient must refuse critical extensions it does
	// not understand, and Kiln understands none.
	if _, ok := unverified.Header["crit"]; ok {
		return nil, unauthorized("token header names critical extensions (crit), which are not supported")
	}
	alg, _ := unverified.Header["alg"].(string)
	kid, _ := unverified.Header["kid"].(string)
	iss, _ := claims["iss"].(string)
	own := iss == v.cfg.Issuer
	allowed := v.cfg.Algorithms
	if own {
		allowed = []string{"ES256"}
	}
	if strings.EqualFold(alg, "none") || !slices.Contains(allowed, alg) {
		return nil, unauthorized("token algorithm %q is not accepted", alg)
	}
	if !own && len(v.cfg.TrustedIssuers) > 0 && !slices.Contains(v.cfg.TrustedIssuers, iss) {
		return nil, unauthorized("token issuer %q is not trusted", iss)
	}
	keyFunc := func(t *jwt.Token) (any, error) {
		switch {
		case own:
			if kid != "" && kid != v.cfg.Key.KeyID {
				return nil, fmt.Errorf("unknown key %q", kid)
			}
			return v.cfg.Key.Private.Public(), nil
		case strings.HasPrefix(alg, "HS"):
			if v.secret == nil {
				return nil, errors.New("HMAC tokens are not accepted")
			}
			return v.secret, nil
		case v.file != nil:
			if ks := v.file.Key(kid); len(ks) > 0 {
				return ks[0].Key, nil
			}
			if kid == "" && len(v.file.Keys) == 1 {
				return v.file.Keys[0].Key, nil
			}
			return nil, fmt.Errorf("unknown key %q", kid)
		case v.remote != nil:
			k, err := v.remote.key(ctx, kid)
			if err != nil {
				return nil, err
			}
			return k.Key, nil
		}
		return nil, errors.New("no keys are configured for other issuers")
	}
	var checked jwt.MapClaims
	_, err = jwt.ParseWithClaims(token, &checked, keyFunc,
		jwt.WithValidMethods(allowed),
		jwt.WithLeeway(v.cfg.Skew),
		jwt.WithExpirationRequired(),
		jwt.WithAudience(v.cfg.Audience),
		jwt.WithTimeFunc(v.cfg.Now),
	)
	switch {
	case err == nil:
	case errors.Is(err, jwt.ErrTokenExpired):
		return nil, unauthorized("the bearer token has expired")
	case errors.Is(err, jwt.ErrTokenNotValidYet):
		return nil, unauthorized("the bearer token is not valid yet (nbf)")
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return nil, unauthorized("the bearer token's audience is not %s", v.cfg.Audience)
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return nil, unauthorized("the bearer token's signature does not verify")
	default:
		return nil, unauthorized("bearer token rejected: %v", err)
	}
	// Kiln's own tokens never live longer than MaxTokenLifetime: a token
	// claiming more was not minted by this server's rules.
	if exp, err := checked.GetExpirationTime(); own && err == nil && exp != nil && exp.Sub(v.cfg.Now()) > MaxTokenLifetime+v.cfg.Skew {
		return nil, unauthorized("the bearer token's lifetime exceeds %v", MaxTokenLifetime)
	}
	name, _ := checked[v.cfg.PrincipalClaim].(string)
	if name == "" {
		return nil, unauthorized("the bearer token has no %s claim", v.cfg.PrincipalClaim)
	}
	scope, _ := checked["scope"].(string)
	if scope == "" {
		// Some issuers send scopes as a list (scp).
		if list, ok := checked["scp"].([]any); ok {
			var parts []string
			for _, s := range list {
				if str, ok := s.(string); ok {
					parts = append(parts, str)
				}
			}
			scope = strings.Join(parts, " ")
		}
	}
	p := ParseScopes(name, scope).Under(v.cfg.Tenancy)
	p.Issuer = iss
	// SMART launch context: the patient that patient/ scopes are bound to.
	if pc, ok := checked["patient"].(string); ok && fhir.ValidID(pc) {
		p.PatientContext = pc
	}
	return p, nil
}

// KeySetError is the last failure to fetch the JWKS URL (nil when none, or
// after a success): for the server's log, never for the caller.
func (v *Verifier) KeySetError() error {
	if v.remote == nil {
		return nil
	}
	return v.remote.Err()
}

// Tenancy is the tenancy the verifier applies to every token.
func (v *Verifier) Tenancy() kiln.Tenancy { return v.cfg.Tenancy }

// Mint signs a token with Kiln's key (the token endpoint and kiln token use it).
// MaxTokenLifetime bounds the lifetime of tokens Kiln issues and accepts from itself.
const MaxTokenLifetime = 24 * time.Hour

func (v *Verifier) Mint(sub, scope string, lifetime time.Duration, extra map[string]any) (string, error) {
	if lifetime <= 0 || lifetime > MaxTokenLifetime {
		return "", fmt.Errorf("token lifetime %v is outside (0, %v]", lifetime, MaxTokenLifetime)
	}
	now := v.cfg.Now()
	claims := jwt.MapClaims{
		"iss": v.cfg.Issuer, "sub": sub, "aud": v.cfg.Audience, "scope": scope,
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(lifetime).Unix(), "jti": newJTI(),
	}
	for k, val := range extra {
		claims[k] = val
	}
	t := jwt.NewWithClaims(jwt.SigningMethodES256, claims)
	t.Header["kid"] = v.cfg.Key.KeyID
	return t.SignedString(v.cfg.Key.Private)
}

// MintHS256 signs a development token with the shared secret.
func MintHS256(secret []byte, iss, aud, sub, scope string, lifetime time.Duration) (string, error) {
	now := time.Now()
	t := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{
		"iss": iss, "sub": sub, "aud": aud, "scope": scope,
		"iat": now.Unix(), "exp": now.Add(lifetime).Unix(), "jti": newJTI(),
	})
	return t.SignedString(secret)
}
