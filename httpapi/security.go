package httpapi

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
)

type principalKey struct{}

// principal is who the request acts for; without authentication, Anonymous.
func principal(r *http.Request) *auth.Principal {
	if p, ok := r.Context().Value(principalKey{}).(*auth.Principal); ok {
		return p
	}
	return auth.Anonymous()
}

// open reports whether path is served without a token.
func (s *Server) open(r *http.Request) bool {
	switch r.URL.Path {
	case "/healthz", "/readyz", "/auth/token", "/auth/jwks", "/.well-known/smart-configuration",
		s.cfg.BasePath + "/metadata", s.cfg.BasePath + "/.well-known/smart-configuration":
		return true
	}
	return false
}

// authenticate verifies the bearer token of r; it answers 401 itself and
// returns nil when the token is missing or bad.
func (s *Server) authenticate(w http.ResponseWriter, r *http.Request) *http.Request {
	if s.cfg.Verifier == nil || s.open(r) {
		return r
	}
	token := ""
	if h := r.Header.Get("Authorization"); len(h) > 7 && strings.EqualFold(h[:7], "Bearer ") {
		token = strings.TrimSpace(h[7:])
	}
	p, err := s.cfg.Verifier.Verify(r.Context(), token)
	if err != nil {
		desc := strings.ReplaceAll(kiln.ErrorMessage(err), `"`, "'")
		if token == "" {
			// RFC 6750 §3.1: a request that sent no credentials gets no error code.
			w.Header().Set("WWW-Authenticate", `Bearer realm="kiln"`)
		} else {
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="kiln", error="invalid_token", error_description="%s"`, desc))
		}
		s.log.Info("authentication failed", "path", r.URL.Path, "reason", desc)
		if kerr := s.cfg.Verifier.KeySetError(); kerr != nil {
			s.log.Warn("the JWKS URL could not be fetched", "err", kerr)
		}
		s.cfg.Metrics.AuthFailure(failureReason(desc))
		writeOutcome(w, http.StatusUnauthorized, "error", "security", kiln.ErrorMessage(err))
		return nil
	}
	p.Refs = s.refOptions(r) // absolute references to this server count as its own
	return r.WithContext(context.WithValue(r.Context(), principalKey{}, p))
}

// smartConfiguration answers /.well-known/smart-configuration (SMART App
// Launch 2 / Backend Services). Without authentication there is nothing to
// discover, and a 404 is what tells an auto-detecting client to send no token.
func (s *Server) smartConfiguration(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Verifier == nil {
		writeOutcome(w, http.StatusNotFound, "error", "not-found", "authentication is off: this server takes requests without tokens")
		return
	}
	root := s.publicURL(r, "")
	cfg := map[string]any{
		"issuer":                                root + s.cfg.BasePath,
		"token_endpoint_auth_methods_supported": []string{"private_key_jwt"},
		"token_endpoint_auth_signing_alg_values_supported": []string{"RS384", "ES384"},
		"grant_types_supported":                            []string{"client_credentials"},
		"scopes_supported":                                 []string{"system/*.read", "system/*.rs", "user/*.read", "user/*.rs", "access/*.read"},
		"capabilities":                                     []string{"client-confidential-asymmetric", "permission-v1", "permission-v2"},
	}
	if s.cfg.Key != nil {
		cfg["jwks_uri"] = root + "/auth/jwks"
	}
	if s.cfg.Token != nil {
		cfg["token_endpoint"] = root + "/auth/token"
	}
	writeJSON(w, http.StatusOK, "application/json", cfg)
}

func (s *Server) jwks(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Verifier == nil || s.cfg.Key == nil {
		writeOutcome(w, http.StatusNotFound, "error", "not-found", "authentication is off: this server issues no tokens")
		return
	}
	b, _ := json.Marshal(s.cfg.Key.JWKS())
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
}

func (s *Server) token(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Token == nil {
		writeOutcome(w, http.StatusNotFound, "error", "not-found", "authentication is off: this server issues no tokens")
		return
	}
	s.cfg.Token.ServeHTTP(w, r)
}

// authorizeWrite asks the policy (auth.Principal.CheckWrite) about a write,
// giving it the record's last version with a body.
func (s *Server) authorizeWrite(r *http.Request, w *kiln.Write) error {
	if s.cfg.Verifier == nil {
		return nil // no authentication: the anonymous principal may write anything
	}
	return principal(r).CheckWrite(w, func() ([]byte, error) { return s.lastBody(r.Context(), w.Type, w.ID) })
}

// lastBody returns the body of the record's newest version that has one
// (the current version, or the one before its deletion); nil when the
// record never existed.
func (s *Server) lastBody(ctx context.Context, typ, id string) ([]byte, error) {
	cur, err := s.store.Read(ctx, typ, id)
	if err == nil {
		return cur.Body, nil
	}
	switch kiln.ErrorCode(err) {
	case kiln.ENOTFOUND:
		return nil, nil
	case kiln.EGONE:
	default:
		return nil, err
	}
	versions, err := s.store.History(ctx, typ, id)
	if kiln.ErrorCode(err) == kiln.ENOTFOUND {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	for _, v := range versions {
		if !v.Deleted && v.Body != nil {
			return v.Body, nil
		}
	}
	return nil, nil
}

// failureReason buckets a token rejection for the metric label.
func failureReason(msg string) string {
	for _, r := range []struct{ substr, reason string }{
		{"no bearer token", "missing"}, {"malformed", "malformed"}, {"expired", "expired"},
		{"not valid yet", "not_yet_valid"}, {"signature", "signature"}, {"audience", "audience"},
		{"issuer", "issuer"}, {"algorithm", "algorithm"}, {"unknown key", "unknown_key"},
	} {
		if strings.Contains(msg, r.substr) {
			return r.reason
		}
	}
	return "other"
}
