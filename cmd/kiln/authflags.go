package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
	"github.com/kiln-fhir/kiln/httpapi"
)

type authFlags struct {
	mode, issuer, audience        string
	jwksURL, jwksFile, secretFile string
	trusted, algorithms, claim    string
	signingKey, tenancy           string
	insecureNoAuth                bool
}

func (a *authFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&a.mode, "auth", "none", "none (no tokens; loopback only unless --insecure-no-auth) or jwt (bearer tokens on every endpoint but metadata, discovery, health and the token endpoint)")
	fs.BoolVar(&a.insecureNoAuth, "insecure-no-auth", false, "allow --auth none on a non-loopback address (logs a warning)")
	fs.StringVar(&a.issuer, "auth-issuer", "", "iss of the tokens Kiln issues (default: the FHIR base URL)")
	fs.StringVar(&a.audience, "auth-audience", "", "aud every token must carry (default: the issuer)")
	fs.StringVar(&a.jwksURL, "auth-jwks-url", "", "JWKS URL of another trusted token issuer (cached; refreshed on an unknown kid)")
	fs.StringVar(&a.jwksFile, "auth-jwks-file", "", "JWKS file of another trusted token issuer")
	fs.StringVar(&a.secretFile, "auth-secret-file", "", "shared HS256 secret (≥ 32 bytes) for development tokens; not with JWKS")
	fs.StringVar(&a.trusted, "auth-trusted-issuers", "", "comma-separated iss values accepted from those keys (default: any)")
	fs.StringVar(&a.algorithms, "auth-algorithms", "", "comma-separated JWS algorithms accepted from other issuers (default: RS256,RS384,RS512,ES256,ES384,ES512,PS256; HS256 with a secret)")
	fs.StringVar(&a.claim, "auth-principal-claim", "sub", "token claim that names the principal owning export jobs (e.g. username)")
	fs.StringVar(&a.tenancy, "tenancy", string(kiln.TenancyNone), "none (access/ scopes optional: a token without one reads every record its resource scopes allow) or access-tags (the Helix contract: a token without an access/ scope may read and export nothing)")
	fs.StringVar(&a.signingKey, "auth-signing-key", "", "PEM file of Kiln's token signing key, created if missing (default: <data>/auth/signing-key.pem)")
}

// checkBind refuses to serve without authentication beyond loopback.
func (a *authFlags) checkBind(addr string, log *slog.Logger) error {
	if a.mode != "none" {
		return nil
	}
	loopback, err := isLoopback(addr)
	if err != nil {
		return err
	}
	if loopback {
		return nil
	}
	if !a.insecureNoAuth {
		return fmt.Errorf("refusing to serve %s without authentication: use --auth jwt, or --insecure-no-auth if the network is trusted", addr)
	}
	log.Warn("SERVING WITHOUT AUTHENTICATION on a non-loopback address: anyone who reaches it can read and export every record", "addr", addr)
	return nil
}

// isLoopback reports whether a listen address is on loopback only.
func isLoopback(addr string) (bool, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false, fmt.Errorf("--addr %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	return host == "localhost" || (ip != nil && ip.IsLoopback()), nil
}

// publicURL is the base clients reach the server at: --public-url, or, on
// loopback, the listener's own address. Beyond loopback it must be given:
// otherwise every URL Kiln hands out would follow the request's Host
// header, which any client can forge.
func publicURL(flag, addr string, ln net.Addr) (string, error) {
	if flag != "" {
		return strings.TrimSuffix(flag, "/"), nil
	}
	loopback, err := isLoopback(addr)
	if err != nil {
		return "", err
	}
	if !loopback {
		return "", fmt.Errorf("--public-url is required when serving on %s: without it the URLs Kiln hands out (Content-Location, manifest files, SMART endpoints) would follow each request's Host header, which a client can forge", addr)
	}
	return "http://" + ln.String(), nil
}

func (a *authFlags) keyPath(data string) string {
	if a.signingKey != "" {
		return a.signingKey
	}
	return filepath.Join(data, "auth", "signing-key.pem")
}

func (a *authFlags) verifier(public, basePath, data string) (*auth.Verifier, *auth.SigningKey, error) {
	key, err := auth.LoadOrCreateKey(a.keyPath(data))
	if err != nil {
		return nil, nil, err
	}
	issuer := a.issuer
	if issuer == "" {
		issuer = public + basePath
	}
	v, err := auth.NewVerifier(auth.Config{
		Issuer: issuer, Audience: a.audience, Key: key,
		TrustedIssuers: splitList(a.trusted), JWKSURL: a.jwksURL, JWKSFile: a.jwksFile, SecretFile: a.secretFile,
		Algorithms: splitList(a.algorithms), PrincipalClaim: a.claim, Tenancy: kiln.Tenancy(a.tenancy),
	})
	return v, key, err
}

// setup turns on authentication in the HTTP configuration.
func (a *authFlags) setup(hc *httpapi.Config, db backend, public, basePath, data string) error {
	switch a.mode {
	case "none":
		return nil
	case "jwt":
	default:
		return fmt.Errorf("--auth %q: use none or jwt", a.mode)
	}
	v, key, err := a.verifier(public, basePath, data)
	if err != nil {
		return err
	}
	clients, ok := db.(kiln.ClientStore)
	if !ok {
		return fmt.Errorf("this store keeps no clients")
	}
	hc.Verifier, hc.Key, hc.RequiresAccessToken = v, key, true
	hc.Token = &auth.TokenServer{Verifier: v, Clients: clients, URL: public + "/auth/token"}
	return nil
}

// cmdClient manages SMART Backend Services clients.
func cmdClient(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "Usage: kiln client add|list|remove [flags]")
		return errUsage
	}
	fs := flag.NewFlagSet("kiln client "+args[0], flag.ContinueOnError)
	var sf storeFlags
	sf.register(fs)
	id := fs.String("id", "", "client id (the iss and sub of its assertions)")
	jwksFile := fs.String("jwks-file", "", "file with the client's public JWKS")
	jwksURL := fs.String("jwks-url", "", "URL of the client's public JWKS")
	scope := fs.String("scope", "", `scopes the client may be granted, e.g. "system/*.read access/tenantA.read"`)
	if err := parseFlags(fs, args[1:], stderr); err != nil {
		return err
	}
	db, closer, err := sf.open(ctx)
	if err != nil {
		return err
	}
	defer closer.Close()
	clients, ok := db.(kiln.ClientStore)
	if !ok {
		return fmt.Errorf("this store keeps no clients")
	}
	switch args[0] {
	case "add":
		if *id == "" || *scope == "" || (*jwksFile == "") == (*jwksURL == "") {
			return fmt.Errorf("kiln client add needs --id, --scope and one of --jwks-file or --jwks-url")
		}
		// A scope Kiln cannot read could never be granted: refuse it now
		// rather than at the client's first token request.
		for _, f := range strings.Fields(*scope) {
			if _, err := auth.ParseScope(f); err != nil {
				return fmt.Errorf("--scope: %w", err)
			}
		}
		c := &kiln.Client{ID: *id, JWKSURL: *jwksURL, Scope: *scope, Created: time.Now().UTC()}
		if *jwksFile != "" {
			b, err := os.ReadFile(*jwksFile)
			if err != nil {
				return err
			}
			if _, err := auth.ParseJWKS(b); err != nil {
				return err
			}
			c.JWKS = b
		}
		if err := clients.PutClient(ctx, c); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "client %s registered with scope %q\n", c.ID, c.Scope)
	case "list":
		list, err := clients.Clients(ctx)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tKEYS\tSCOPE")
		for _, c := range list {
			keys := "inline JWKS"
			if c.JWKSURL != "" {
				keys = c.JWKSURL
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", c.ID, keys, c.Scope)
		}
		tw.Flush()
	case "remove":
		if *id == "" {
			return fmt.Errorf("kiln client remove needs --id")
		}
		if err := clients.DeleteClient(ctx, *id); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "client %s removed\n", *id)
	default:
		return fmt.Errorf("kiln client %s: use add, list or remove", args[0])
	}
	return nil
}

// cmdToken mints a development token.
func cmdToken(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kiln token", flag.ContinueOnError)
	var a authFlags
	a.register(fs)
	data := fs.String("data", "./kiln-data", "data folder holding Kiln's signing key")
	public := fs.String("public-url", "http://127.0.0.1:8080", "the server's scheme://host:port (its issuer is this plus --base-path)")
	basePath := fs.String("base-path", "/4_0_0", "FHIR base path")
	scope := fs.String("scope", "system/*.read", "scopes of the token (add access/<code>.read, or access/*.read, for a server with --tenancy access-tags)")
	sub := fs.String("sub", "dev", "principal (sub)")
	lifetime := fs.Duration("lifetime", 5*time.Minute, "token lifetime")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: kiln token [flags]\n\nMints a bearer token for trying the API: with --auth-secret-file an HS256 token,\notherwise one signed with Kiln's own key in --data.\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	issuer := a.issuer
	if issuer == "" {
		issuer = strings.TrimSuffix(*public, "/") + httpapi.CleanBasePath(*basePath)
	}
	aud := a.audience
	if aud == "" {
		aud = issuer
	}
	if a.secretFile != "" {
		b, err := os.ReadFile(a.secretFile)
		if err != nil {
			return err
		}
		tok, err := auth.MintHS256([]byte(strings.TrimSpace(string(b))), "kiln-dev", aud, *sub, *scope, *lifetime)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, tok)
		return nil
	}
	v, _, err := a.verifier(strings.TrimSuffix(*public, "/"), httpapi.CleanBasePath(*basePath), *data)
	if err != nil {
		return err
	}
	tok, err := v.Mint(*sub, *scope, *lifetime, nil)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, tok)
	return nil
}
