// Package httpapi is Kiln's HTTP interface: the FHIR REST API under the base
// path, bulk export kick-off, status, cancel and file download, metadata and
// health checks. It translates domain errors into OperationOutcomes.
package httpapi

import (
	"context"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/metrics"
	"golang.org/x/sync/semaphore"
	"golang.org/x/time/rate"
)

const (
	fhirJSON   = "application/fhir+json"
	fhirNDJSON = "application/fhir+ndjson"
)

// Config tunes the HTTP interface.
type Config struct {
	// BasePath is the FHIR base path (default /4_0_0).
	BasePath string
	// PublicURL is the scheme and host clients reach Kiln at, used in
	// Content-Location, manifest and Location URLs (default: from the request's Host).
	PublicURL string
	// MaxBodyBytes limits request bodies (default 16 MiB).
	MaxBodyBytes int64
	// MaxBodyValues limits the JSON values (objects, arrays, members,
	// elements) of one request body (default 1,000,000), and MaxBodyDepth its
	// nesting (default 100): decoding a value costs far more memory than its
	// bytes, so a body of tiny objects is refused before it is decoded.
	MaxBodyValues int
	MaxBodyDepth  int
	// DecodeBudget bounds the JSON values of all request bodies being
	// decoded and held at once (default 4 × MaxBodyValues); a request waits
	// for its share, so memory stays bounded under parallel large bodies.
	DecodeBudget int64
	// RetryAfter is the delay, in seconds, status responses ask for (default 2).
	RetryAfter int
	// PollBurst is how many status polls in a row may come sooner than half
	// of Retry-After before they get 429 (default 10; negative disables).
	PollBurst int
	Logger    *slog.Logger
	// Verifier turns on bearer-token authentication (nil: none, every request
	// is the anonymous principal with full access).
	Verifier *auth.Verifier
	// Key is Kiln's signing key, published at /auth/jwks; Token is the token endpoint.
	Key   *auth.SigningKey
	Token http.Handler
	// RequiresAccessToken is the manifest's requiresAccessToken: true when file
	// downloads from Kiln need the bearer token.
	RequiresAccessToken bool
	// Metrics records requests; MetricsHandler, if set, serves /metrics
	// (behind authentication like every other endpoint).
	Metrics        *metrics.Metrics
	MetricsHandler http.Handler
	// KickOffsPerMinute limits kick-offs per principal (default 30, burst 10; negative: no limit).
	KickOffsPerMinute int
	// MaxDownloads limits concurrent export file downloads (default 32); more get 429.
	MaxDownloads int
	// MaxDownloadsPerClient limits one export owner's concurrent downloads
	// (default a quarter of MaxDownloads, at least 1), so that one client's
	// slow reads cannot take every slot from the others.
	MaxDownloadsPerClient int
}

// Store is what the REST API needs.
type Store interface {
	kiln.ResourceStore
	kiln.ViewStore
	kiln.SecretStore
}

// Server is the HTTP handler.
type Server struct {
	store   Store
	exports *export.Service
	cfg     Config
	log     *slog.Logger
	mux     *http.ServeMux
	ready   func() error

	mu       sync.Mutex
	polls    map[string]*pollState
	kickoffs map[string]*rate.Limiter
	// downloads is a semaphore of concurrent file downloads; clientDownloads
	// counts each owner's (under mu).
	downloads       chan struct{}
	clientDownloads map[string]int
	// decoding holds the DecodeBudget.
	decoding *semaphore.Weighted
	// cursors encrypts search cursors (made on first use; under cursorMu).
	cursorMu sync.Mutex
	cursors  cipher.Block
}

type pollState struct {
	last  time.Time     // when the last status answer went out
	retry time.Duration // the Retry-After it advertised
	early int
}

// CleanBasePath returns a FHIR base path as the server uses it: "" for the
// root (so that "/" serves /$export, /Patient/$export, … as the seed writes
// them), otherwise "/a/b" with no trailing slash.
func CleanBasePath(p string) string {
	if t := strings.Trim(p, "/"); t != "" {
		return "/" + t
	}
	return ""
}

// New returns the handler. ready reports whether the server can take traffic.
func New(store Store, exports *export.Service, cfg Config, ready func() error) *Server {
	if cfg.BasePath == "" {
		cfg.BasePath = "/4_0_0"
	}
	cfg.BasePath = CleanBasePath(cfg.BasePath)
	cfg.PublicURL = strings.TrimSuffix(cfg.PublicURL, "/")
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = 16 << 20
	}
	if cfg.RetryAfter <= 0 {
		cfg.RetryAfter = 2
	}
	if cfg.PollBurst == 0 {
		cfg.PollBurst = 10
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if ready == nil {
		ready = func() error { return nil }
	}
	if cfg.KickOffsPerMinute == 0 {
		cfg.KickOffsPerMinute = 30
	}
	if cfg.MaxDownloads <= 0 {
		cfg.MaxDownloads = 32
	}
	if cfg.MaxBodyValues <= 0 {
		cfg.MaxBodyValues = 1_000_000
	}
	if cfg.MaxBodyDepth <= 0 {
		cfg.MaxBodyDepth = 100
	}
	if cfg.DecodeBudget < int64(cfg.MaxBodyValues) {
		cfg.DecodeBudget = 4 * int64(cfg.MaxBodyValues)
	}
	if cfg.MaxDownloadsPerClient <= 0 {
		cfg.MaxDownloadsPerClient = max(1, cfg.MaxDownloads/4)
	}
	s := &Server{store: store, exports: exports, cfg: cfg, log: cfg.Logger, mux: http.NewServeMux(), ready: ready,
		polls: map[string]*pollState{}, kickoffs: map[string]*rate.Limiter{}, downloads: make(chan struct{}, cfg.MaxDownloads), clientDownloads: map[string]int{},
		decoding: semaphore.NewWeighted(cfg.DecodeBudget)}
	s.routes()
	return s
}

func (s *Server) routes() {
	b := s.cfg.BasePath
	h := s.mux.HandleFunc
	h("GET /healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	h("GET /.well-known/smart-configuration", s.smartConfiguration)
	if b != "" {
		h("GET "+b+"/.well-known/smart-configuration", s.smartConfiguration)
	}
	h("GET /auth/jwks", s.jwks)
	// Every method, so that the token endpoint answers 405 itself; one
	// pattern per method because a method-less "/auth/token" conflicts with
	// "GET /{type}/{id}" when the FHIR base is the root.
	for _, m := range []string{"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} {
		h(m+" /auth/token", s.token)
	}
	h("GET /readyz", s.readyz)
	h("GET "+b+"/metadata", s.metadata)
	if s.cfg.MetricsHandler != nil {
		s.mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
			// The totals are the whole server's, every tenant's: only a
			// token that reads every tenant (access/*.read) may see them.
			if !principal(r).AccessAll {
				s.writeError(w, r, auth.Forbidden("/metrics holds every tenant's totals: it needs access/*.read"))
				return
			}
			s.cfg.MetricsHandler.ServeHTTP(w, r)
		})
	}

	for _, m := range []string{"GET", "POST"} {
		h(m+" "+b+"/$export", s.kickOff(kiln.LevelSystem))
		h(m+" "+b+"/Patient/$export", s.kickOff(kiln.LevelPatient))
		h(m+" "+b+"/Group/{id}/$export", s.kickOff(kiln.LevelGroup))
	}
	h("GET "+b+"/$export/{job}", s.exportStatus)
	h("DELETE "+b+"/$export/{job}", s.exportCancel)
	h("GET "+b+"/$export/{job}/file/{name}", s.exportFile)

	h("GET "+b+"/ViewDefinition", s.listViews)
	h("POST "+b+"/ViewDefinition", s.putView)
	h("GET "+b+"/ViewDefinition/{id}", s.getView)
	h("PUT "+b+"/ViewDefinition/{id}", s.putView)
	h("DELETE "+b+"/ViewDefinition/{id}", s.deleteView)
	h("POST "+b+"/ViewDefinition/$viewdefinition-run", s.viewRun)
	h("POST "+b+"/$viewdefinition-run", s.viewRun)
	h("POST "+b+"/ViewDefinition/$viewdefinition-export", s.viewExport)
	h("POST "+b+"/$viewdefinition-export", s.viewExport)

	h("POST "+b+"/{$}", s.bundle)
	if b != "" {
		h("POST "+b, s.bundle)
	}
	h("GET "+b+"/{type}", s.search)
	h("POST "+b+"/{type}", s.create)
	h("GET "+b+"/{type}/{id}", s.read)
	h("PUT "+b+"/{type}/{id}", s.update)
	h("DELETE "+b+"/{type}/{id}", s.delete)
	h("GET "+b+"/{type}/{id}/_history", s.history)
	h("GET "+b+"/{type}/{id}/_history/{vid}", s.vread)
	h("/", func(w http.ResponseWriter, r *http.Request) {
		writeOutcome(w, http.StatusNotFound, "error", "not-found", fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path))
	})
}

// ServeHTTP adds a request id, recovers panics as 500 OperationOutcomes and logs each request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	id := r.Header.Get("X-Request-Id")
	if id == "" || len(id) > 64 {
		var b [8]byte
		rand.Read(b[:])
		id = hex.EncodeToString(b[:])
	}
	w.Header().Set("X-Request-Id", id)
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			s.log.Error("panic in handler", "method", r.Method, "path", r.URL.Path, "request", id, "panic", fmt.Sprint(p))
			if !rec.wrote {
				writeOutcome(rec, http.StatusInternalServerError, "error", "exception", "internal error (request "+id+")")
			}
		}
		s.log.Debug("http", "method", r.Method, "path", r.URL.Path, "status", rec.status, "request", id, "ms", time.Since(start).Milliseconds())
	}()
	r.Body = http.MaxBytesReader(rec, r.Body, s.cfg.MaxBodyBytes)
	lease := &bodyLease{sem: s.decoding, maxValues: s.cfg.MaxBodyValues, maxDepth: s.cfg.MaxBodyDepth}
	defer lease.release()
	rec.onAnswer = lease.release
	r = r.WithContext(context.WithValue(r.Context(), bodyLeaseKey{}, lease))
	authed := s.authenticate(rec, r)
	if authed == nil {
		s.cfg.Metrics.HTTP("authentication", rec.status, time.Since(start))
		return
	}
	s.mux.ServeHTTP(rec, authed)
	// The mux sets the matched pattern on the request it was given.
	s.cfg.Metrics.HTTP(authed.Pattern, rec.status, time.Since(start))
}

type statusRecorder struct {
	http.ResponseWriter
	status int
	wrote  bool
	// onAnswer runs once when the response starts: the request's decode
	// budget goes back then, so a client slow to read its answer holds none.
	onAnswer func()
}

func (r *statusRecorder) WriteHeader(code int) {
	if !r.wrote {
		r.status, r.wrote = code, true
		r.answering()
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if !r.wrote {
		r.wrote = true
		r.answering()
	}
	return r.ResponseWriter.Write(b)
}

// answering runs onAnswer once, as the response starts.
func (r *statusRecorder) answering() {
	if r.onAnswer != nil {
		r.onAnswer()
		r.onAnswer = nil
	}
}

func (r *statusRecorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	if err := s.ready(); err != nil {
		writeOutcome(w, http.StatusServiceUnavailable, "error", "transient", "not ready: "+err.Error())
		return
	}
	w.Write([]byte("ready\n"))
}

// publicURL is the absolute URL of path on this server.
func (s *Server) publicURL(r *http.Request, path string) string {
	if s.cfg.PublicURL != "" {
		return s.cfg.PublicURL + path
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host + path
}

// RefOptions returns how references to this server are recognised, for a request.
func (s *Server) refOptions(r *http.Request) fhir.Options {
	return fhir.Options{Bases: []string{s.publicURL(r, s.cfg.BasePath)}}
}

// readBody reads the request body within the size limit and, when the
// request came through the Server, the JSON value and depth limits, taking
// the body's share of the decode budget until the request ends.
func readBody(r *http.Request) ([]byte, error) {
	b, err := io.ReadAll(r.Body)
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return nil, &kiln.Error{Code: kiln.ETOOLARGE, Message: fmt.Sprintf("request body is larger than the limit of %d bytes", mbe.Limit)}
	}
	if err != nil {
		return nil, kiln.Invalid("body", "request body could not be read: %v", err)
	}
	if lease, ok := r.Context().Value(bodyLeaseKey{}).(*bodyLease); ok {
		if err := lease.take(r.Context(), b); err != nil {
			return nil, err
		}
	}
	return b, nil
}

type bodyLeaseKey struct{}

// bodyLease is a request's share of the decode budget.
type bodyLease struct {
	sem                 *semaphore.Weighted
	maxValues, maxDepth int
	held                int64
}

func (l *bodyLease) take(ctx context.Context, b []byte) error {
	values, depth := jsonShape(b)
	if depth > l.maxDepth {
		return kiln.Invalid("body", "the JSON body nests %d deep; at most %d levels are accepted", depth, l.maxDepth)
	}
	if values > l.maxValues {
		return &kiln.Error{Code: kiln.ETOOLARGE, Message: fmt.Sprintf("the JSON body holds %d values; at most %d are accepted in one request", values, l.maxValues)}
	}
	if err := l.sem.Acquire(ctx, int64(values)); err != nil {
		return fmt.Errorf("wait to decode the body: %w", err)
	}
	l.held += int64(values)
	return nil
}

func (l *bodyLease) release() {
	if l.held > 0 {
		l.sem.Release(l.held)
		l.held = 0
	}
}

// jsonShape counts the values of a JSON text (every object, array, member
// and element, approximately: separators and openings) and its deepest
// nesting, in one pass over the bytes and without decoding it.
func jsonShape(b []byte) (values, depth int) {
	d, inString, escaped := 0, false, false
	values = 1
	for _, c := range b {
		switch {
		case inString:
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
		case c == '{' || c == '[':
			d++
			depth = max(depth, d)
			values++
		case c == '}' || c == ']':
			d--
		case c == ',' || c == ':':
			values++
		}
	}
	return values, depth
}
