package httpapi

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
	"github.com/kiln-fhir/kiln/fhir"
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

// canRead checks the type scope for a read or search.
func canRead(p *auth.Principal, typ string) error {
	if !p.CanRead(typ) {
		return auth.Forbidden("the token's scopes do not allow reading %s (SMART v2: r)", typ)
	}
	return nil
}

// canSearch checks the type scope for a search (SMART v2: s).
func canSearch(p *auth.Principal, typ string) error {
	if !p.CanSearch(typ) {
		return auth.Forbidden("the token's scopes do not allow searching %s (SMART v2: s)", typ)
	}
	return nil
}

// readable reports whether p may read (act ActRead) or find by search
// (ActSearch) a stored resource of typ: its access tags, and the query
// filters and patient context of p's scopes for typ.
func readable(p *auth.Principal, act auth.Action, typ string, body []byte) bool {
	return visible(p, body) && p.Matches(act, typ, body)
}

// visible reports whether p may see a stored resource body (by its access tags).
func visible(p *auth.Principal, body []byte) bool {
	if p.AccessAll {
		return true
	}
	return p.CanSee(accessCodes(body))
}

func accessCodes(body []byte) []string { return kiln.AccessCodesOf(body) }

// onlyInCompartment reports whether a body of typ is in the compartment of
// patient and of no other patient.
func onlyInCompartment(typ string, body []byte, patient string, refs fhir.Options) bool {
	m, err := fhir.DecodeJSON(body)
	return err == nil && auth.OnlyInCompartment(typ, m, patient, refs)
}

// authorizeWrite checks a write: the type scope, the access codes the new
// version carries, and that the record as it stands (its last version with a
// body, so a deleted record keeps its tenant) is the writer's to change.
// A record the writer may not see answers 404, whether it is live, deleted
// or another tenant's, so that a write reveals nothing a read would not.
func (s *Server) authorizeWrite(r *http.Request, w *kiln.Write) error {
	if s.cfg.Verifier == nil {
		return nil // no authentication: the anonymous principal may write anything
	}
	p := principal(r)
	if !p.CanWrite(w.Type) {
		return auth.Forbidden("the token's scopes do not allow writing %s", w.Type)
	}
	patient, patientOnly := p.WritesOnlyPatient(w.Type)
	if patientOnly && w.Kind != kiln.Delete && !onlyInCompartment(w.Type, w.Body, patient, p.Refs) {
		return auth.Forbidden("the token's patient/ scopes allow writing only resources in the compartment of Patient/%s and of no other patient", patient)
	}
	if w.Kind != kiln.Delete {
		if !p.CanTag(w.AccessCodes) {
			return auth.Forbidden("the token may not write records tagged %v (%s)", w.AccessCodes, kiln.AccessSystem)
		}
		if len(w.AccessCodes) == 0 && tenantBound(p) {
			return kiln.Invalid("meta.security", "a record written with a tenant-limited token must carry one of its access codes (%s)", kiln.AccessSystem)
		}
	}
	before, err := s.lastBody(r.Context(), w.Type, w.ID)
	if err != nil {
		return err
	}
	if before == nil {
		return nil // a new record
	}
	if !visible(p, before) || patientOnly && !onlyInCompartment(w.Type, before, patient, p.Refs) {
		return kiln.Errorf(kiln.ENOTFOUND, "%s/%s is not known", w.Type, w.ID)
	}
	if codes := accessCodes(before); !p.CanTag(codes) {
		return auth.Forbidden("the token may not change records tagged %v (%s): it needs write access to each", codes, kiln.AccessSystem)
	}
	return nil
}

// readableHistory keeps the versions (newest first) that p may read: each
// version with a body is judged by its own tags and p's filters, and a
// deletion by the version it deleted. A record re-tagged between tenants
// shows each tenant only its own versions.
func readableHistory(p *auth.Principal, typ string, versions []kiln.Resource) []kiln.Resource {
	out := versions[:0:0]
	for i, v := range versions {
		if !v.Deleted {
			if readable(p, auth.ActRead, typ, v.Body) {
				out = append(out, v)
			}
			continue
		}
		for _, older := range versions[i+1:] {
			if !older.Deleted {
				if readable(p, auth.ActRead, typ, older.Body) {
					out = append(out, v)
				}
				break
			}
		}
	}
	return out
}

// tenantBound reports whether p writes under a tenant limit: it holds
// access/ scopes, none of them for every tenant.
func tenantBound(p *auth.Principal) bool {
	return p.HasAccessScope && !slices.Contains(p.AccessWrite, "*")
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
