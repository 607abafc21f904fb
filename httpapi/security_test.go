package httpapi_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/auth"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/httpapi"
)

type authRig struct {
	*env
	key      *auth.SigningKey
	verifier *auth.Verifier
	rsaKey   *rsa.PrivateKey
}

// newAuthEnv runs Kiln with --auth jwt: its own key, plus an RSA JWKS file
// for tokens of a trusted issuer "https://idp.example"; --tenancy is
// o.tenancy, access-tags when unset.
func newAuthEnv(t *testing.T, o envOpts) *authRig {
	t.Helper()
	if o.tenancy == "" {
		o.tenancy = kiln.TenancyAccessTags
	}
	dir := t.TempDir()
	key, err := auth.LoadOrCreateKey(filepath.Join(dir, "signing-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: rk.Public(), KeyID: "idp-1", Algorithm: "RS256", Use: "sig"}}})
	jwksFile := filepath.Join(dir, "idp.jwks")
	os.WriteFile(jwksFile, jwks, 0o600)
	r := &authRig{key: key, rsaKey: rk}
	o.configure = func(e *env, hc *httpapi.Config, _ *export.Config) {
		v, err := auth.NewVerifier(auth.Config{Issuer: e.base, Key: key, JWKSFile: jwksFile, TrustedIssuers: []string{"https://idp.example"}, Tenancy: o.tenancy})
		if err != nil {
			t.Fatal(err)
		}
		r.verifier = v
		clients := e.db.(kiln.ClientStore)
		hc.Verifier, hc.Key, hc.RequiresAccessToken = v, key, true
		hc.Token = &auth.TokenServer{Verifier: v, Clients: clients, URL: e.root + "/auth/token"}
	}
	r.env = newEnv(t, o)
	return r
}

func (r *authRig) token(t *testing.T, sub, scope string) string {
	t.Helper()
	tok, err := r.verifier.Mint(sub, scope, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func (r *authRig) idpToken(t *testing.T, method jwt.SigningMethod, key any, claims jwt.MapClaims, header map[string]any) string {
	t.Helper()
	tk := jwt.NewWithClaims(method, claims)
	for k, v := range header {
		tk.Header[k] = v
	}
	s, err := tk.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func bearer(tok string) []string { return []string{"Authorization", "Bearer " + tok} }

func TestAuthRejectsBadTokens(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	now := time.Now()
	base := func() jwt.MapClaims {
		return jwt.MapClaims{"iss": "https://idp.example", "sub": "u1", "aud": r.base, "scope": "system/*.read access/*.read", "exp": now.Add(time.Minute).Unix()}
	}
	with := func(k string, v any) jwt.MapClaims {
		c := base()
		if v == nil {
			delete(c, k)
		} else {
			c[k] = v
		}
		return c
	}
	otherEC, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rs := jwt.SigningMethodRS256
	kid := map[string]any{"kid": "idp-1"}
	pubDER := r.rsaKey.Public()
	cases := []struct {
		name, token, want string
	}{
		{"no token", "", "no bearer token"},
		{"malformed", "not.a.jwt", "malformed bearer token"},
		{"alg none", r.idpToken(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, base(), kid), `algorithm "none" is not accepted`},
		{"HMAC against an RSA key set", r.idpToken(t, jwt.SigningMethodHS256, []byte(fmt.Sprint(pubDER)), base(), kid), `algorithm "HS256" is not accepted`},
		{"bad signature", func() string {
			s := r.idpToken(t, rs, r.rsaKey, base(), kid)
			return s[:len(s)-6] + "AAAAAA"
		}(), "signature does not verify"},
		{"forged own token", r.idpToken(t, jwt.SigningMethodES256, otherEC, jwt.MapClaims{"iss": r.base, "sub": "x", "aud": r.base, "exp": now.Add(time.Minute).Unix()}, map[string]any{"kid": r.key.KeyID}), "signature does not verify"},
		{"crit header", r.idpToken(t, rs, r.rsaKey, base(), map[string]any{"kid": "idp-1", "crit": []string{"exp"}}), "critical extensions"},
		{"expired", r.idpToken(t, rs, r.rsaKey, with("exp", now.Add(-10*time.Minute).Unix()), kid), "has expired"},
		{"no exp", r.idpToken(t, rs, r.rsaKey, with("exp", nil), kid), "exp claim is required"},
		{"not yet valid", r.idpToken(t, rs, r.rsaKey, with("nbf", now.Add(10*time.Minute).Unix()), kid), "not valid yet"},
		{"wrong issuer", r.idpToken(t, rs, r.rsaKey, with("iss", "https://evil.example"), kid), `issuer "https://evil.example" is not trusted`},
		{"wrong audience", r.idpToken(t, rs, r.rsaKey, with("aud", "https://other.example"), kid), "audience is not"},
		{"unknown kid", r.idpToken(t, rs, r.rsaKey, base(), map[string]any{"kid": "nope"}), `unknown key "nope"`},
	}
	for _, c := range cases {
		var h []string
		if c.token != "" {
			h = bearer(c.token)
		}
		res := r.do("GET", "/Patient", nil, h...)
		if res.StatusCode != 401 {
			t.Errorf("%s: %d, want 401: %s", c.name, res.StatusCode, res.body)
			continue
		}
		if !strings.HasPrefix(res.Header.Get("WWW-Authenticate"), "Bearer ") {
			t.Errorf("%s: WWW-Authenticate %q", c.name, res.Header.Get("WWW-Authenticate"))
		}
		if txt := res.outcomeText(t); !strings.Contains(txt, c.want) {
			t.Errorf("%s: outcome %q lacks %q", c.name, txt, c.want)
		}
	}
	// The good ones: a trusted issuer's token, and Kiln's own.
	if res := r.do("GET", "/Patient", nil, bearer(r.idpToken(t, rs, r.rsaKey, base(), kid))...); res.StatusCode != 200 {
		t.Errorf("trusted issuer token: %d %s", res.StatusCode, res.body)
	}
	if res := r.do("GET", "/Patient", nil, bearer(r.token(t, "u2", "user/*.read access/*.read"))...); res.StatusCode != 200 {
		t.Errorf("own token: %d %s", res.StatusCode, res.body)
	}
	// Open endpoints need no token.
	root := strings.TrimSuffix(r.base, "/4_0_0")
	for _, p := range []string{r.base + "/metadata", root + "/.well-known/smart-configuration", root + "/healthz", root + "/auth/jwks"} {
		if res := r.do("GET", p, nil); res.StatusCode != 200 {
			t.Errorf("%s without a token: %d", p, res.StatusCode)
		}
	}
	// A scope without the type: 403.
	if res := r.do("GET", "/Observation", nil, bearer(r.token(t, "u3", "system/Patient.read access/*.read"))...); res.StatusCode != 403 {
		t.Errorf("read outside the scopes: %d", res.StatusCode)
	}
}

// tagged writes the Synthea set as NDJSON whose resources alternate between
// tenants A and B, and returns the folder and each tenant's Type/id set.
func tagged(t *testing.T) (string, map[string]map[string]bool) {
	t.Helper()
	return taggedSet(t, "synthea-r4-100")
}

// taggedSet copies a Synthea set with every resource tagged tenantA or
// tenantB in turn, and returns the folder and which type/id each owns.
func taggedSet(t *testing.T, set string) (string, map[string]map[string]bool) {
	t.Helper()
	src := dataDir(t, set)
	out := t.TempDir()
	owned := map[string]map[string]bool{"tenantA": {}, "tenantB": {}}
	files, _ := filepath.Glob(filepath.Join(src, "*.ndjson.gz"))
	for _, f := range files {
		in, _ := os.Open(f)
		zr, _ := gzip.NewReader(in)
		sc := bufio.NewScanner(zr)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		var lines []string
		i := 0
		for sc.Scan() {
			var m map[string]any
			json.Unmarshal(sc.Bytes(), &m)
			tenant := []string{"tenantA", "tenantB"}[i%2]
			i++
			m["meta"] = map[string]any{"security": []any{map[string]any{"system": kiln.AccessSystem, "code": tenant}}}
			owned[tenant][m["resourceType"].(string)+"/"+m["id"].(string)] = true
			b, _ := json.Marshal(m)
			lines = append(lines, string(b))
		}
		in.Close()
		os.WriteFile(filepath.Join(out, strings.TrimSuffix(filepath.Base(f), ".gz")), []byte(strings.Join(lines, "\n")+"\n"), 0o644)
	}
	return out, owned
}

func TestTenantIsolation(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	dir, owned := tagged(t)
	r.load(dir)
	a := r.token(t, "alice", "system/*.read access/tenantA.read")
	b := r.token(t, "bob", "system/*.read access/tenantB.read")

	// Exports: exactly the tenant's own resources, at every level.
	groupRes := r.do("GET", "/Group/"+syntheaGroup, nil, bearer(a)...)
	groupTenant := "tenantA"
	if groupRes.StatusCode == 404 {
		groupTenant = "tenantB"
	}
	for _, tc := range []struct {
		tok, tenant string
	}{{a, "tenantA"}, {b, "tenantB"}} {
		for _, path := range []string{"/$export", "/Patient/$export"} {
			m := r.mustCompleteAuth(r.kickOff("GET", path, nil, bearer(tc.tok)...), tc.tok)
			if !m.RequiresAccessToken {
				t.Error("manifest says no token is needed")
			}
			got := map[string]bool{}
			for _, it := range m.Output {
				for _, l := range r.linesAuth(it.URL, tc.tok) {
					var res struct{ ResourceType, ID string }
					json.Unmarshal(l, &res)
					got[res.ResourceType+"/"+res.ID] = true
				}
			}
			for ref := range got {
				if !owned[tc.tenant][ref] {
					t.Fatalf("%s export for %s holds %s, which is not the tenant's", path, tc.tenant, ref)
				}
			}
			if path == "/$export" && len(got) != len(owned[tc.tenant]) {
				t.Errorf("%s system export: %d resources, tenant owns %d", tc.tenant, len(got), len(owned[tc.tenant]))
			}
		}
		// The Group belongs to one tenant: the other gets 404 at kick-off.
		res := r.do("GET", "/Group/"+syntheaGroup+"/$export", nil, bearer(tc.tok)...)
		want := 202
		if tc.tenant != groupTenant {
			want = 404
		}
		if res.StatusCode != want {
			t.Errorf("%s Group kick-off: %d, want %d", tc.tenant, res.StatusCode, want)
		}
	}
	// Search and reads.
	page := r.do("GET", "/Patient?_count=1000", nil, bearer(a)...).json(t)
	var want int
	for ref := range owned["tenantA"] {
		if strings.HasPrefix(ref, "Patient/") {
			want++
		}
	}
	if int(page["total"].(float64)) != want {
		t.Errorf("tenant A search: %v patients, owns %d", page["total"], want)
	}
	var bPatient string
	for ref := range owned["tenantB"] {
		if strings.HasPrefix(ref, "Patient/") {
			bPatient = ref
			break
		}
	}
	if res := r.do("GET", "/"+bPatient, nil, bearer(a)...); res.StatusCode != 404 {
		t.Errorf("A reads B's %s: %d", bPatient, res.StatusCode)
	}
	// Naming B's patient at kick-off gets the answer a made-up id gets: the
	// id's use by another tenant does not show.
	for _, p := range []string{bPatient, "Patient/no-such-patient"} {
		res := r.do("GET", "/Patient/$export?patient="+p, nil, bearer(a)...)
		if res.StatusCode != 400 || !strings.Contains(string(res.body), p+" does not exist") {
			t.Errorf("A exports %s: %d %s", p, res.StatusCode, res.body)
		}
	}
	if res := r.do("GET", "/Patient/$export?patient="+bPatient, nil, bearer(b)...); res.StatusCode != 202 {
		t.Errorf("B exports its own %s: %d %s", bPatient, res.StatusCode, res.body)
	} else {
		r.do("DELETE", res.Header.Get("Content-Location"), nil, bearer(b)...)
	}
	if res := r.do("GET", "/"+bPatient+"/_history", nil, bearer(a)...); res.StatusCode != 404 {
		t.Errorf("A reads B's history: %d", res.StatusCode)
	}
	if res := r.do("GET", "/"+bPatient, nil, bearer(b)...); res.StatusCode != 200 {
		t.Errorf("B reads its own %s: %d", bPatient, res.StatusCode)
	}
	// Writes: only with the tenant's own tags, and write scopes.
	aw := r.token(t, "alice", "system/*.write system/*.read access/tenantA.*")
	ct := "application/fhir+json"
	body := func(tenant string) []byte {
		return []byte(fmt.Sprintf(`{"resourceType":"Patient","meta":{"security":[{"system":"%s","code":"%s"}]}}`, kiln.AccessSystem, tenant))
	}
	if res := r.do("POST", "/Patient", body("tenantA"), append(bearer(aw), "Content-Type", ct)...); res.StatusCode != 201 {
		t.Errorf("A writes its own: %d %s", res.StatusCode, res.body)
	}
	if res := r.do("POST", "/Patient", body("tenantB"), append(bearer(aw), "Content-Type", ct)...); res.StatusCode != 403 {
		t.Errorf("A writes B's tag: %d", res.StatusCode)
	}
	if res := r.do("POST", "/Patient", body("tenantA"), append(bearer(a), "Content-Type", ct)...); res.StatusCode != 403 {
		t.Errorf("write with read scopes: %d", res.StatusCode)
	}

	// Jobs belong to their principal: anyone else gets the unknown-id 404.
	loc := r.kickOff("GET", "/$export?_type=Patient", nil, bearer(a)...)
	m := r.mustCompleteAuth(loc, a)
	for _, c := range []struct{ method, url string }{{"GET", loc}, {"DELETE", loc}, {"GET", m.Output[0].URL}} {
		if res := r.do(c.method, c.url, nil, bearer(b)...); res.StatusCode != 404 {
			t.Errorf("bob %s %s: %d, want 404", c.method, c.url, res.StatusCode)
		}
	}
	if res := r.do("GET", m.Output[0].URL, nil); res.StatusCode != 401 {
		t.Errorf("file without a token: %d, want 401", res.StatusCode)
	}
	// patient/ scopes may not export; a token with no access/ scope may not either.
	pt := r.token(t, "pat", "patient/*.read access/tenantA.read")
	for _, c := range []struct{ method, url string }{{"GET", r.base + "/$export"}, {"GET", loc}, {"GET", m.Output[0].URL}} {
		if res := r.do(c.method, c.url, nil, bearer(pt)...); res.StatusCode != 403 {
			t.Errorf("patient/ token %s %s: %d, want 403", c.method, c.url, res.StatusCode)
		}
	}
	if res := r.do("GET", "/$export", nil, bearer(r.token(t, "x", "system/*.read"))...); res.StatusCode != 403 || !strings.Contains(res.outcomeText(t), "no access/ scope") {
		t.Errorf("no access/ scope: %d %s", res.StatusCode, res.body)
	}
	// A _type outside the token's scopes: an error-file line and no data for it.
	narrow := r.token(t, "carol", "system/Patient.read access/tenantA.read")
	m = r.mustCompleteAuth(r.kickOff("GET", "/$export?_type=Patient,Observation", nil, bearer(narrow)...), narrow)
	if len(m.Output) != 1 || m.Output[0].Type != "Patient" || len(m.Error) != 1 {
		t.Fatalf("narrow token manifest: %+v", m)
	}
	if l := r.linesAuth(m.Error[0].URL, narrow); len(l) != 1 || !strings.Contains(string(l[0]), "Cannot access Observation") {
		t.Errorf("error file: %s", l)
	}
	// Without _type, just the permitted types, and the error file says the
	// scopes cut the export down (issue 19, finding 7), naming no type.
	m = r.mustCompleteAuth(r.kickOff("GET", "/$export", nil, bearer(narrow)...), narrow)
	if len(m.Output) != 1 || m.Output[0].Type != "Patient" || len(m.Error) != 1 {
		t.Fatalf("no _type with a Patient-only token: %+v", m)
	}
	if l := r.linesAuth(m.Error[0].URL, narrow); len(l) != 1 || !strings.Contains(string(l[0]), "scopes allow") || strings.Contains(string(l[0]), "Observation") {
		t.Errorf("error file of a scope-narrowed export: %s", l)
	}
	// A token that reads every type: no such statement.
	m = r.mustCompleteAuth(r.kickOff("GET", "/$export", nil, bearer(a)...), a)
	if len(m.Error) != 0 {
		t.Errorf("error file with a token that reads everything: %+v", m.Error)
	}
}

func (r *authRig) linesAuth(u, tok string) [][]byte {
	r.t.Helper()
	res := r.do("GET", u, nil, bearer(tok)...)
	if res.StatusCode != 200 {
		r.t.Fatalf("GET %s: %d %s", u, res.StatusCode, res.body)
	}
	var out [][]byte
	for _, l := range strings.Split(strings.TrimSpace(string(res.body)), "\n") {
		if l != "" {
			out = append(out, []byte(l))
		}
	}
	return out
}

func (r *authRig) mustCompleteAuth(loc, tok string) manifest {
	r.t.Helper()
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		res := r.do("GET", loc, nil, bearer(tok)...)
		if res.StatusCode == 202 {
			continue
		}
		if res.StatusCode != 200 {
			r.t.Fatalf("status: %d %s", res.StatusCode, res.body)
		}
		var m manifest
		json.Unmarshal(res.body, &m)
		return m
	}
	r.t.Fatal("export did not finish")
	return manifest{}
}

// TestBackendServices: register a client with an ES384 key, get a token from
// /auth/token, run a Group export with it and download the files with it;
// without the token the download is 401. Then the token endpoint's refusals.
func TestBackendServices(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	r.load(dataDir(t, "synthea-r4-10"))
	root := strings.TrimSuffix(r.base, "/4_0_0")
	ck, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: ck.Public(), KeyID: "c1", Algorithm: "ES384", Use: "sig"}}})
	if err := r.db.(kiln.ClientStore).PutClient(context.Background(), &kiln.Client{ID: "bulk-client", JWKS: jwks, Scope: "system/*.read access/*.read system/Patient.read"}); err != nil {
		t.Fatal(err)
	}
	cfg := r.do("GET", root+"/.well-known/smart-configuration", nil).json(t)
	tokenURL := cfg["token_endpoint"].(string)
	if tokenURL != root+"/auth/token" || !slices.Contains(toStrings(cfg["token_endpoint_auth_methods_supported"]), "private_key_jwt") {
		t.Fatalf("smart-configuration: %v", cfg)
	}
	assertion := func(claims jwt.MapClaims, key any, method jwt.SigningMethod, kid string) string {
		tk := jwt.NewWithClaims(method, claims)
		tk.Header["kid"] = kid
		s, err := tk.SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	claims := func(jti string) jwt.MapClaims {
		return jwt.MapClaims{"iss": "bulk-client", "sub": "bulk-client", "aud": tokenURL, "exp": time.Now().Add(4 * time.Minute).Unix(), "jti": jti}
	}
	post := func(form url.Values) response {
		return r.do("POST", tokenURL, []byte(form.Encode()), "Content-Type", "application/x-www-form-urlencoded")
	}
	form := func(a, scope string) url.Values {
		return url.Values{"grant_type": {"client_credentials"}, "client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}, "client_assertion": {a}, "scope": {scope}}
	}
	first := assertion(claims("jti-1"), ck, jwt.SigningMethodES384, "c1")
	res := post(form(first, "system/*.read access/*.read"))
	if res.StatusCode != 200 {
		t.Fatalf("token: %d %s", res.StatusCode, res.body)
	}
	tr := res.json(t)
	tok := tr["access_token"].(string)
	if !strings.EqualFold(tr["token_type"].(string), "bearer") || tr["expires_in"].(float64) > 300 || tr["scope"] != "system/*.read access/*.read" {
		t.Fatalf("token response: %v", tr)
	}
	// A Group export with the token; the files need it.
	var gid string
	page := r.do("GET", "/Group", nil, bearer(tok)...).json(t)
	gid = page["entry"].([]any)[0].(map[string]any)["resource"].(map[string]any)["id"].(string)
	m := r.mustCompleteAuth(r.kickOff("GET", "/Group/"+gid+"/$export", nil, bearer(tok)...), tok)
	if !m.RequiresAccessToken || len(m.Output) == 0 {
		t.Fatalf("manifest: %+v", m)
	}
	n := 0
	for _, it := range m.Output {
		n += len(r.linesAuth(it.URL, tok))
	}
	if n == 0 {
		t.Fatal("nothing exported")
	}
	if res := r.do("GET", m.Output[0].URL, nil); res.StatusCode != 401 {
		t.Errorf("download without the token: %d", res.StatusCode)
	}

	otherKey, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	cases := []struct {
		name   string
		form   url.Values
		status int
		code   string
	}{
		{"replayed jti", form(first, "system/*.read"), 401, "invalid_client"},
		{"no scope", form(assertion(claims("jti-8"), ck, jwt.SigningMethodES384, "c1"), ""), 400, "invalid_scope"},
		{"unknown client", form(assertion(jwt.MapClaims{"iss": "nobody", "sub": "nobody", "aud": tokenURL, "exp": time.Now().Add(time.Minute).Unix(), "jti": "j2"}, ck, jwt.SigningMethodES384, "c1"), "system/*.read"), 401, "invalid_client"},
		{"scope not granted", form(assertion(claims("jti-3"), ck, jwt.SigningMethodES384, "c1"), "system/*.write"), 400, "invalid_scope"},
		{"wrong key", form(assertion(claims("jti-4"), otherKey, jwt.SigningMethodES384, "c1"), "system/*.read"), 401, "invalid_client"},
		{"wrong audience", form(assertion(jwt.MapClaims{"iss": "bulk-client", "sub": "bulk-client", "aud": "https://x", "exp": time.Now().Add(time.Minute).Unix(), "jti": "j5"}, ck, jwt.SigningMethodES384, "c1"), "system/*.read"), 401, "invalid_client"},
		{"exp too far", form(assertion(jwt.MapClaims{"iss": "bulk-client", "sub": "bulk-client", "aud": tokenURL, "exp": time.Now().Add(time.Hour).Unix(), "jti": "j6"}, ck, jwt.SigningMethodES384, "c1"), "system/*.read"), 401, "invalid_client"},
		{"ES256 not allowed", func() url.Values {
			k256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			return form(assertion(claims("j7"), k256, jwt.SigningMethodES256, "c1"), "system/*.read")
		}(), 401, "invalid_client"},
		{"bad grant type", url.Values{"grant_type": {"not_a_grant_type"}}, 400, "unsupported_grant_type"},
		{"bad assertion type", url.Values{"grant_type": {"client_credentials"}, "client_assertion_type": {"not_an_assertion_type"}, "client_assertion": {first}}, 400, "invalid_request"},
	}
	for _, c := range cases {
		res := post(c.form)
		var body struct{ Error, ErrorDescription string }
		json.Unmarshal(res.body, &body)
		if res.StatusCode != c.status || body.Error != c.code {
			t.Errorf("%s: %d %s, want %d %s", c.name, res.StatusCode, res.body, c.status, c.code)
		}
	}
	// A second API server on the same store (as behind a load balancer)
	// refuses an assertion the first one took, and the other way round.
	second := &auth.TokenServer{Verifier: r.verifier, Clients: r.db.(kiln.ClientStore), URL: tokenURL}
	viaSecond := func(a string) int {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest("POST", tokenURL, strings.NewReader(form(a, "system/*.read").Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		second.ServeHTTP(rec, req)
		return rec.Code
	}
	if code := viaSecond(first); code != 401 {
		t.Errorf("an assertion used on one server, replayed on another: %d", code)
	}
	fresh := assertion(claims("jti-other-server"), ck, jwt.SigningMethodES384, "c1")
	if code := viaSecond(fresh); code != 200 {
		t.Errorf("a fresh assertion on the second server: %d", code)
	}
	if res := post(form(fresh, "system/*.read")); res.StatusCode != 401 {
		t.Errorf("replayed on the first server after the second took it: %d", res.StatusCode)
	}
}

// TestScopeQueryFilters: a token with system/Observation.rs?category=laboratory
// reads, searches and exports laboratory Observations only.
func TestScopeQueryFilters(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	r.load(dataDir(t, "synthea-r4-10"))
	all := r.token(t, "all", "system/*.read access/*.read")
	lab := r.token(t, "lab", "system/Observation.rs?category=laboratory system/Patient.rs access/*.read")
	total := func(tok, query string) int {
		t.Helper()
		b := r.do("GET", "/Observation?_total=accurate&_count=1&"+query, nil, bearer(tok)...).json(t)
		n, ok := b["total"].(float64)
		if !ok {
			t.Fatalf("Observation?%s: no total in %v", query, b)
		}
		return int(n)
	}
	labCount, allCount := total(all, "category=laboratory"), total(all, "")
	if labCount == 0 || labCount == allCount {
		t.Fatalf("test data: %d laboratory Observations of %d", labCount, allCount)
	}
	if got := total(lab, ""); got != labCount {
		t.Errorf("search with the filtered scope: %d Observations, %d are laboratory", got, labCount)
	}
	if got := total(lab, "category=vital-signs"); got != 0 {
		t.Errorf("vital signs through a laboratory scope: %d", got)
	}
	firstID := func(query string) string {
		b := r.do("GET", "/Observation?_count=1&"+query, nil, bearer(all)...).json(t)
		return b["entry"].([]any)[0].(map[string]any)["resource"].(map[string]any)["id"].(string)
	}
	if res := r.do("GET", "/Observation/"+firstID("category=vital-signs"), nil, bearer(lab)...); res.StatusCode != 404 {
		t.Errorf("read of a vital-signs Observation: %d", res.StatusCode)
	}
	if res := r.do("GET", "/Observation/"+firstID("category=laboratory"), nil, bearer(lab)...); res.StatusCode != 200 {
		t.Errorf("read of a laboratory Observation: %d", res.StatusCode)
	}
	m := r.mustCompleteAuth(r.kickOff("GET", "/$export?_type=Observation,Patient", nil, bearer(lab)...), lab)
	counts := map[string]int{}
	for _, it := range m.Output {
		for _, l := range r.linesAuth(it.URL, lab) {
			counts[it.Type]++
			if it.Type == "Observation" && !bytes.Contains(l, []byte(`"code":"laboratory"`)) {
				t.Fatalf("exported a non-laboratory Observation: %.200s", l)
			}
		}
	}
	patients := r.do("GET", "/Patient?_total=accurate&_count=1", nil, bearer(all)...).json(t)["total"].(float64)
	if counts["Observation"] != labCount || counts["Patient"] != int(patients) {
		t.Errorf("export: %v, want %d Observations and %v Patients", counts, labCount, patients)
	}
}
