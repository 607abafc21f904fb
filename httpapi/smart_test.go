package httpapi_test

// Tests for issue 18: a standard SMART Backend Services client, knowing only
// the FHIR base URL, its client id and its private key, exports through Kiln
// on both tenancy settings; and one regression test per finding.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/golang-jwt/jwt/v5"

	"github.com/kiln-fhir/kiln"
)

// smartClient plays a generic Backend Services client: everything it knows
// of the server comes from discovery and the Bulk Data protocol.
type smartClient struct {
	t    *testing.T
	base string // the FHIR base URL
	id   string
	key  *rsa.PrivateKey
	jti  int
}

const smartKID = "client-key-1"

func newSmartClient(t *testing.T, base, id string) (*smartClient, []byte) {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: k.Public(), KeyID: smartKID, Algorithm: "RS384", Use: "sig"}}})
	return &smartClient{t: t, base: base, id: id, key: k}, jwks
}

func (c *smartClient) get(u string, headers ...string) (*http.Response, []byte) {
	c.t.Helper()
	return c.send("GET", u, nil, headers...)
}

func (c *smartClient) send(method, u string, body io.Reader, headers ...string) (*http.Response, []byte) {
	c.t.Helper()
	req, err := http.NewRequest(method, u, body)
	if err != nil {
		c.t.Fatal(err)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res, b
}

// discover reads the token endpoint from .well-known/smart-configuration and
// checks that it offers what a Backend Services client needs.
func (c *smartClient) discover() string {
	c.t.Helper()
	res, b := c.get(c.base+"/.well-known/smart-configuration", "Accept", "application/json")
	if res.StatusCode != 200 {
		c.t.Fatalf("discovery: %d %s", res.StatusCode, b)
	}
	var cfg struct {
		TokenEndpoint string   `json:"token_endpoint"`
		AuthMethods   []string `json:"token_endpoint_auth_methods_supported"`
		Algs          []string `json:"token_endpoint_auth_signing_alg_values_supported"`
		Grants        []string `json:"grant_types_supported"`
		Capabilities  []string `json:"capabilities"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		c.t.Fatalf("discovery: %v", err)
	}
	if cfg.TokenEndpoint == "" || !slices.Contains(cfg.AuthMethods, "private_key_jwt") || !slices.Contains(cfg.Algs, "RS384") ||
		!slices.Contains(cfg.Grants, "client_credentials") || !slices.Contains(cfg.Capabilities, "client-confidential-asymmetric") {
		c.t.Fatalf("discovery does not offer Backend Services: %s", b)
	}
	return cfg.TokenEndpoint
}

// assertion signs a client assertion for aud (RS384, as SMART requires support for).
func (c *smartClient) assertion(aud string, header map[string]any) string {
	c.t.Helper()
	c.jti++
	tk := jwt.NewWithClaims(jwt.SigningMethodRS384, jwt.MapClaims{
		"iss": c.id, "sub": c.id, "aud": aud, "exp": time.Now().Add(4 * time.Minute).Unix(),
		"jti": fmt.Sprintf("%s-%d-%d", c.id, time.Now().UnixNano(), c.jti),
	})
	tk.Header["kid"] = smartKID
	maps.Copy(tk.Header, header)
	s, err := tk.SignedString(c.key)
	if err != nil {
		c.t.Fatal(err)
	}
	return s
}

type tokenAnswer struct {
	status      int
	AccessToken string `json:"access_token"`
	TokenType   string `json:"token_type"`
	ExpiresIn   int    `json:"expires_in"`
	Scope       string `json:"scope"`
	Error       string `json:"error"`
	Description string `json:"error_description"`
}

func (c *smartClient) postToken(tokenURL string, form url.Values) tokenAnswer {
	c.t.Helper()
	res, b := c.send("POST", tokenURL, strings.NewReader(form.Encode()), "Content-Type", "application/x-www-form-urlencoded")
	var a tokenAnswer
	if err := json.Unmarshal(b, &a); err != nil {
		c.t.Fatalf("token answer %d is not JSON: %s", res.StatusCode, b)
	}
	a.status = res.StatusCode
	return a
}

func (c *smartClient) tokenForm(tokenURL, scope string) url.Values {
	return url.Values{
		"grant_type":            {"client_credentials"},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
		"client_assertion":      {c.assertion(tokenURL, nil)},
		"scope":                 {scope},
	}
}

// token gets an access token for scope, failing the test on any error.
func (c *smartClient) token(tokenURL, scope string) tokenAnswer {
	c.t.Helper()
	a := c.postToken(tokenURL, c.tokenForm(tokenURL, scope))
	if a.status != 200 || a.AccessToken == "" || !strings.EqualFold(a.TokenType, "bearer") || a.ExpiresIn <= 0 || a.ExpiresIn > 300 {
		c.t.Fatalf("token for %q: %+v", scope, a)
	}
	return a
}

// kickOff starts a system export; it returns the status URL, or the
// response when the server did not accept it.
func (c *smartClient) kickOff(tok string) (string, *http.Response, []byte) {
	c.t.Helper()
	res, b := c.get(c.base+"/$export", "Accept", "application/fhir+json", "Prefer", "respond-async", "Authorization", "Bearer "+tok)
	if res.StatusCode != 202 {
		return "", res, b
	}
	loc := res.Header.Get("Content-Location")
	if loc == "" {
		c.t.Fatal("202 without Content-Location")
	}
	return loc, res, b
}

type bulkManifest struct {
	TransactionTime     string `json:"transactionTime"`
	RequiresAccessToken bool   `json:"requiresAccessToken"`
	Output              []struct {
		Type string `json:"type"`
		URL  string `json:"url"`
	} `json:"output"`
	Error []struct {
		Type string `json:"type"`
		URL  string `json:"url"`
	} `json:"error"`
}

// await polls the status URL, sleeping as Retry-After says, until the
// manifest is there.
func (c *smartClient) await(loc, tok string) bulkManifest {
	c.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		res, b := c.get(loc, "Accept", "application/json", "Authorization", "Bearer "+tok)
		switch res.StatusCode {
		case 200:
			var m bulkManifest
			if err := json.Unmarshal(b, &m); err != nil {
				c.t.Fatalf("manifest: %v: %s", err, b)
			}
			return m
		case 202, 429:
			secs, err := strconv.Atoi(res.Header.Get("Retry-After"))
			if err != nil || secs < 1 {
				c.t.Fatalf("%d without a usable Retry-After: %q", res.StatusCode, res.Header.Get("Retry-After"))
			}
			time.Sleep(time.Duration(secs) * time.Second) // the protocol's own wait, not a guess
		default:
			c.t.Fatalf("status: %d %s", res.StatusCode, b)
		}
	}
	c.t.Fatalf("export %s did not finish", loc)
	return bulkManifest{}
}

// download reads every output file with the token and returns type/id of
// each resource.
func (c *smartClient) download(m bulkManifest, tok string) map[string]bool {
	c.t.Helper()
	got := map[string]bool{}
	for _, o := range m.Output {
		res, b := c.get(o.URL, "Accept", "application/fhir+ndjson", "Authorization", "Bearer "+tok)
		if res.StatusCode != 200 {
			c.t.Fatalf("download %s: %d %s", o.URL, res.StatusCode, b)
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			var r struct{ ResourceType, ID string }
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				c.t.Fatalf("%s: %v", o.URL, err)
			}
			ref := r.ResourceType + "/" + r.ID
			if got[ref] {
				c.t.Errorf("%s exported twice", ref)
			}
			got[ref] = true
		}
	}
	return got
}

// cancel deletes the export and checks it is gone.
func (c *smartClient) cancel(loc, tok string) {
	c.t.Helper()
	if res, b := c.send("DELETE", loc, nil, "Authorization", "Bearer "+tok); res.StatusCode != 202 {
		c.t.Fatalf("delete: %d %s", res.StatusCode, b)
	}
	if res, _ := c.get(loc, "Authorization", "Bearer "+tok); res.StatusCode != 404 {
		c.t.Fatalf("status after delete: %d, want 404", res.StatusCode)
	}
}

// tenantData is synthea-r4-10 with resources alternately tagged tenantA
// and tenantB, and for each resource its tenant and whether it is a
// laboratory Observation.
type tenantData struct {
	dir    string
	tenant map[string]string // type/id → tenant
	lab    map[string]bool   // type/id of laboratory Observations
	// patients are the patient ids each record references (a Patient: its
	// own id), read from the files with a pattern, not with Kiln's code.
	patients map[string][]string
}

var patientRef = regexp.MustCompile(`"reference":"Patient/([^"/]+)"`)

// inPopulation reports whether ref is tied to one of the given patients.
func (d tenantData) inPopulation(ref string, patients map[string]bool) bool {
	for _, p := range d.patients[ref] {
		if patients[p] {
			return true
		}
	}
	return false
}

func newTenantData(t *testing.T) tenantData {
	t.Helper()
	dir, owned := taggedSet(t, "synthea-r4-10")
	d := tenantData{dir: dir, tenant: map[string]string{}, lab: map[string]bool{}, patients: map[string][]string{}}
	files, _ := filepath.Glob(filepath.Join(dir, "*.ndjson"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		for _, line := range bytes.Split(bytes.TrimSpace(b), []byte("\n")) {
			var r struct{ ResourceType, ID string }
			json.Unmarshal(line, &r)
			ref := r.ResourceType + "/" + r.ID
			if r.ResourceType == "Patient" {
				d.patients[ref] = []string{r.ID}
			}
			for _, m := range patientRef.FindAllSubmatch(line, -1) {
				d.patients[ref] = append(d.patients[ref], string(m[1]))
			}
		}
	}
	for tenant, refs := range owned {
		for ref := range refs {
			d.tenant[ref] = tenant
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, "Observation.ndjson"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range bytes.Split(bytes.TrimSpace(b), []byte("\n")) {
		var o struct {
			ID       string
			Category []struct {
				Coding []struct{ System, Code string }
			}
		}
		json.Unmarshal(line, &o)
		for _, c := range o.Category {
			for _, cd := range c.Coding {
				if cd.Code == "laboratory" {
					d.lab["Observation/"+o.ID] = true
				}
			}
		}
	}
	if len(d.lab) == 0 {
		t.Fatal("the test data has no laboratory Observations")
	}
	return d
}

// want returns the resources a token may export: of the types in types
// (nil: every type), laboratory Observations only when labOnly, of tenant
// (empty: every tenant).
func (d tenantData) want(types []string, labOnly bool, tenant string) map[string]bool {
	out := map[string]bool{}
	for ref, tn := range d.tenant {
		typ, _, _ := strings.Cut(ref, "/")
		if types != nil && !slices.Contains(types, typ) {
			continue
		}
		if labOnly && typ == "Observation" && !d.lab[ref] {
			continue
		}
		if tenant != "" && tn != tenant {
			continue
		}
		out[ref] = true
	}
	return out
}

func diffRefs(got, want map[string]bool) string {
	var extra, missing []string
	for r := range got {
		if !want[r] {
			extra = append(extra, r)
		}
	}
	for r := range want {
		if !got[r] {
			missing = append(missing, r)
		}
	}
	if len(extra)+len(missing) == 0 {
		return ""
	}
	slices.Sort(extra)
	slices.Sort(missing)
	return fmt.Sprintf("%d unexpected (e.g. %v), %d missing (e.g. %v)", len(extra), extra[:min(3, len(extra))], len(missing), missing[:min(3, len(missing))])
}

// TestStandardClientScopes: tokens from the token endpoint with the scopes
// standard clients send export exactly what they grant, on both tenancies.
// Under none a token without access/ scopes reads every tenant; under
// access-tags it is refused with insufficient_scope; an access/ scope limits
// the export to its tenant under both.
func TestStandardClientScopes(t *testing.T) {
	data := newTenantData(t)
	cases := []struct {
		scope   string
		types   []string
		labOnly bool
		tenant  string
	}{
		{scope: "system/*.rs"},
		{scope: "system/*.read"},
		{scope: "system/Patient.rs system/Observation.rs", types: []string{"Patient", "Observation"}},
		{scope: "system/Patient.rs system/Observation.rs?category=laboratory", types: []string{"Patient", "Observation"}, labOnly: true},
		{scope: "system/*.rs access/tenantA.read", tenant: "tenantA"},
		{scope: "system/Patient.read system/Observation.read access/tenantB.read", types: []string{"Patient", "Observation"}, tenant: "tenantB"},
		{scope: "system/Observation.rs?category=laboratory access/tenantA.read", types: []string{"Observation"}, labOnly: true, tenant: "tenantA"},
	}
	for _, tenancy := range []kiln.Tenancy{kiln.TenancyNone, kiln.TenancyAccessTags} {
		t.Run(string(tenancy), func(t *testing.T) {
			r := newAuthEnv(t, envOpts{tenancy: tenancy})
			r.load(data.dir)
			c, jwks := newSmartClient(t, r.base, "bulk-client")
			if err := r.db.(kiln.ClientStore).PutClient(context.Background(), &kiln.Client{ID: c.id, JWKS: jwks, Scope: "system/*.read access/*.read"}); err != nil {
				t.Fatal(err)
			}
			tokenURL := c.discover()
			for _, tc := range cases {
				tok := c.token(tokenURL, tc.scope)
				if tok.Scope != tc.scope {
					t.Errorf("%q: granted %q", tc.scope, tok.Scope)
				}
				loc, res, body := c.kickOff(tok.AccessToken)
				if tenancy == kiln.TenancyAccessTags && tc.tenant == "" {
					if res.StatusCode != 403 || !strings.Contains(res.Header.Get("WWW-Authenticate"), `error="insufficient_scope"`) {
						t.Errorf("%q on access-tags: %d %q %s, want 403 insufficient_scope", tc.scope, res.StatusCode, res.Header.Get("WWW-Authenticate"), body)
					}
					continue
				}
				if loc == "" {
					t.Fatalf("%q: kick-off %d %s", tc.scope, res.StatusCode, body)
				}
				m := c.await(loc, tok.AccessToken)
				if d := diffRefs(c.download(m, tok.AccessToken), data.want(tc.types, tc.labOnly, tc.tenant)); d != "" {
					t.Errorf("%q: %s", tc.scope, d)
				}
			}
		})
	}
}

// TestStandardClientEndToEnd plays a Backend Services client from the FHIR
// base URL alone: discovery, token, kick-off, polling by Retry-After,
// download with the token, delete.
func TestStandardClientEndToEnd(t *testing.T) {
	data := newTenantData(t)
	for _, tc := range []struct {
		tenancy kiln.Tenancy
		scope   string
		tenant  string
	}{
		{kiln.TenancyNone, "system/*.rs", ""},
		{kiln.TenancyAccessTags, "system/*.rs access/tenantB.read", "tenantB"},
	} {
		t.Run(string(tc.tenancy), func(t *testing.T) {
			r := newAuthEnv(t, envOpts{tenancy: tc.tenancy})
			r.load(data.dir)
			c, jwks := newSmartClient(t, r.base, "any-client")
			if err := r.db.(kiln.ClientStore).PutClient(context.Background(), &kiln.Client{ID: c.id, JWKS: jwks, Scope: tc.scope}); err != nil {
				t.Fatal(err)
			}
			tok := c.token(c.discover(), tc.scope).AccessToken
			loc, res, body := c.kickOff(tok)
			if loc == "" {
				t.Fatalf("kick-off: %d %s", res.StatusCode, body)
			}
			m := c.await(loc, tok)
			if !m.RequiresAccessToken {
				t.Error("manifest: requiresAccessToken false with authentication on")
			}
			for _, o := range m.Output {
				if res, _ := c.get(o.URL); res.StatusCode != 401 {
					t.Errorf("download without the token: %d", res.StatusCode)
				}
			}
			if d := diffRefs(c.download(m, tok), data.want(nil, false, tc.tenant)); d != "" {
				t.Error(d)
			}
			c.cancel(loc, tok)
		})
	}
}

// TestTokenEndpointScopes (finding 2): scopes are granted by meaning, not by
// spelling; narrower is fine, unknown ones are dropped and the answer says
// what was granted; no scope is invalid_scope.
func TestTokenEndpointScopes(t *testing.T) {
	r := newAuthEnv(t, envOpts{tenancy: kiln.TenancyNone, noWorkers: true})
	c, jwks := newSmartClient(t, r.base, "c")
	if err := r.db.(kiln.ClientStore).PutClient(context.Background(), &kiln.Client{ID: c.id, JWKS: jwks, Scope: "system/*.read access/*.read"}); err != nil {
		t.Fatal(err)
	}
	tokenURL := c.discover()
	for _, tc := range []struct{ requested, granted, err string }{
		{"system/*.rs", "system/*.rs", ""},
		{"system/*.read", "system/*.read", ""},
		{"system/Patient.rs", "system/Patient.rs", ""},
		{"system/Observation.rs access/*.read", "system/Observation.rs access/*.read", ""},
		{"system/Observation.rs?category=laboratory", "system/Observation.rs?category=laboratory", ""},
		{"system/*.rs openid fhirUser system/*.cud", "system/*.rs", ""},
		{"system/*.write", "", "invalid_scope"},
		{"user/*.read", "", "invalid_scope"},
		{"", "", "invalid_scope"},
	} {
		a := c.postToken(tokenURL, c.tokenForm(tokenURL, tc.requested))
		if a.Error != tc.err || a.Scope != tc.granted {
			t.Errorf("requested %q: %d granted %q error %q (%s), want granted %q error %q", tc.requested, a.status, a.Scope, a.Error, a.Description, tc.granted, tc.err)
		}
		if tc.err != "" && a.status != 400 {
			t.Errorf("requested %q: status %d, want 400", tc.requested, a.status)
		}
	}
}

// TestTokenEndpointErrors (finding 5): RFC 6749 §5.2 and SMART Backend
// Services error answers.
func TestTokenEndpointErrors(t *testing.T) {
	r := newAuthEnv(t, envOpts{tenancy: kiln.TenancyNone, noWorkers: true})
	c, jwks := newSmartClient(t, r.base, "c")
	if err := r.db.(kiln.ClientStore).PutClient(context.Background(), &kiln.Client{ID: c.id, JWKS: jwks, Scope: "system/*.read"}); err != nil {
		t.Fatal(err)
	}
	tokenURL := c.discover()
	used := c.tokenForm(tokenURL, "system/*.read")
	if a := c.postToken(tokenURL, used); a.status != 200 {
		t.Fatalf("first use: %+v", a)
	}
	with := func(k, v string) url.Values {
		f := c.tokenForm(tokenURL, "system/*.read")
		if v == "" {
			f.Del(k)
		} else {
			f.Set(k, v)
		}
		return f
	}
	for _, tc := range []struct {
		name   string
		form   url.Values
		status int
		code   string
	}{
		{"replayed jti", used, 401, "invalid_client"},
		{"malformed assertion", with("client_assertion", "not-a-jwt"), 401, "invalid_client"},
		{"typ not JWT", with("client_assertion", c.assertion(tokenURL, map[string]any{"typ": "at+jwt"})), 401, "invalid_client"},
		{"no grant_type", with("grant_type", ""), 400, "invalid_request"},
		{"other grant_type", with("grant_type", "password"), 400, "unsupported_grant_type"},
		{"no assertion", with("client_assertion", ""), 400, "invalid_request"},
		{"repeated parameter", func() url.Values {
			f := c.tokenForm(tokenURL, "system/*.read")
			f.Add("scope", "system/*.rs")
			return f
		}(), 400, "invalid_request"},
	} {
		if a := c.postToken(tokenURL, tc.form); a.status != tc.status || a.Error != tc.code || a.Description == "" {
			t.Errorf("%s: %d %q %q, want %d %s", tc.name, a.status, a.Error, a.Description, tc.status, tc.code)
		}
	}
	// typ JWT (any case) is fine.
	if a := c.postToken(tokenURL, with("client_assertion", c.assertion(tokenURL, map[string]any{"typ": "jwt"}))); a.status != 200 {
		t.Errorf("typ jwt: %+v", a)
	}
	// A JSON body is not a token request.
	js, _ := json.Marshal(map[string]string{"grant_type": "client_credentials", "client_assertion": c.assertion(tokenURL, nil)})
	res, b := c.send("POST", tokenURL, bytes.NewReader(js), "Content-Type", "application/json")
	if res.StatusCode != 400 || !strings.Contains(string(b), `"invalid_request"`) {
		t.Errorf("JSON body: %d %s, want 400 invalid_request", res.StatusCode, b)
	}
	// GET is the wrong method, not an unknown path.
	res, b = c.get(tokenURL)
	if res.StatusCode != 405 || res.Header.Get("Allow") != "POST" || !strings.Contains(string(b), `"invalid_request"`) {
		t.Errorf("GET: %d Allow %q %s, want 405 Allow POST", res.StatusCode, res.Header.Get("Allow"), b)
	}
	if res.Header.Get("Cache-Control") != "no-store" {
		t.Errorf("token answers must not be cached: %q", res.Header.Get("Cache-Control"))
	}
}

// TestDiscoveryTellsTheTruth (findings 3, 4): without authentication there
// is no SMART configuration and no security in the CapabilityStatement; with
// it, both name a token endpoint that answers.
func TestDiscoveryTellsTheTruth(t *testing.T) {
	open := newEnv(t, envOpts{noWorkers: true})
	root := strings.TrimSuffix(open.base, "/4_0_0")
	for _, u := range []string{root + "/.well-known/smart-configuration", open.base + "/.well-known/smart-configuration"} {
		if res := open.do("GET", u, nil); res.StatusCode != 404 {
			t.Errorf("auth none: %s answers %d, want 404", u, res.StatusCode)
		}
	}
	cs := open.do("GET", "/metadata", nil).json(t)
	if _, ok := cs["rest"].([]any)[0].(map[string]any)["security"]; ok {
		t.Error("auth none: the CapabilityStatement claims security")
	}

	r := newAuthEnv(t, envOpts{tenancy: kiln.TenancyNone, noWorkers: true})
	c, _ := newSmartClient(t, r.base, "c")
	tokenURL := c.discover()
	if res := r.do("POST", tokenURL, []byte("grant_type=client_credentials"), "Content-Type", "application/x-www-form-urlencoded"); res.StatusCode != 400 {
		t.Errorf("advertised token endpoint answers %d", res.StatusCode)
	}
	var sc map[string]any
	json.Unmarshal(r.do("GET", r.base+"/.well-known/smart-configuration", nil).body, &sc)
	if jwksURI, _ := sc["jwks_uri"].(string); jwksURI == "" || r.do("GET", jwksURI, nil).StatusCode != 200 {
		t.Errorf("jwks_uri %v does not answer", sc["jwks_uri"])
	}
	for _, want := range []string{"permission-v1", "permission-v2", "client-confidential-asymmetric"} {
		if !slices.Contains(toStrings(sc["capabilities"]), want) {
			t.Errorf("capabilities lack %s: %v", want, sc["capabilities"])
		}
	}
	var meta struct {
		Rest []struct {
			Security struct {
				Service []struct {
					Coding []struct{ System, Code string }
				}
				Extension []struct {
					URL       string
					Extension []struct{ URL, ValueURI string }
				}
			}
		}
	}
	json.Unmarshal(r.do("GET", "/metadata", nil).body, &meta)
	sec := meta.Rest[0].Security
	if len(sec.Service) == 0 || len(sec.Service[0].Coding) == 0 || sec.Service[0].Coding[0].Code != "SMART-on-FHIR" ||
		sec.Service[0].Coding[0].System != "http://terminology.hl7.org/CodeSystem/restful-security-service" {
		t.Errorf("CapabilityStatement security.service: %+v", sec.Service)
	}
	var token string
	for _, e := range sec.Extension {
		if e.URL == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris" {
			for _, sub := range e.Extension {
				if sub.URL == "token" {
					token = sub.ValueURI
				}
			}
		}
	}
	if token != tokenURL {
		t.Errorf("oauth-uris token %q, want %q", token, tokenURL)
	}
}

// TestBearerChallenges (finding 6): RFC 6750 §3.1 WWW-Authenticate.
func TestBearerChallenges(t *testing.T) {
	r := newAuthEnv(t, envOpts{tenancy: kiln.TenancyNone, noWorkers: true})
	res := r.do("GET", "/Patient", nil)
	if h := res.Header.Get("WWW-Authenticate"); res.StatusCode != 401 || !strings.HasPrefix(h, "Bearer") || strings.Contains(h, "error=") {
		t.Errorf("no token: %d %q, want 401 Bearer without an error code", res.StatusCode, h)
	}
	res = r.do("GET", "/Patient", nil, bearer("not.a.token")...)
	if h := res.Header.Get("WWW-Authenticate"); res.StatusCode != 401 || !strings.Contains(h, `error="invalid_token"`) {
		t.Errorf("bad token: %d %q, want invalid_token", res.StatusCode, h)
	}
	res = r.do("GET", "/Patient", nil, bearer(r.token(t, "u", "system/Observation.rs"))...)
	if h := res.Header.Get("WWW-Authenticate"); res.StatusCode != 403 || !strings.Contains(h, `error="insufficient_scope"`) {
		t.Errorf("missing scope: %d %q, want 403 insufficient_scope", res.StatusCode, h)
	}
}

// TestBinaryServedRaw (finding 7): a Binary read asking for its content
// type, or for nothing in particular, gets the content itself; asking for
// FHIR JSON gets the resource.
func TestBinaryServedRaw(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true})
	content := []byte("hello, attachment\n")
	bin := fmt.Sprintf(`{"resourceType":"Binary","id":"b1","contentType":"text/plain","data":%q}`, base64.StdEncoding.EncodeToString(content))
	if res := e.do("PUT", "/Binary/b1", []byte(bin), "Content-Type", "application/fhir+json"); res.StatusCode/100 != 2 {
		t.Fatalf("PUT Binary: %d %s", res.StatusCode, res.body)
	}
	for _, accept := range []string{"text/plain", "*/*", ""} {
		for _, path := range []string{"/Binary/b1", "/Binary/b1/_history/1"} {
			res := e.do("GET", path, nil, "Accept", accept)
			if res.StatusCode != 200 || !bytes.Equal(res.body, content) || !strings.HasPrefix(res.Header.Get("Content-Type"), "text/plain") {
				t.Errorf("%s Accept %q: %d %q %s, want the raw content", path, accept, res.StatusCode, res.Header.Get("Content-Type"), res.body)
			}
			if res.Header.Get("X-Content-Type-Options") != "nosniff" {
				t.Errorf("%s: raw content without nosniff", path)
			}
		}
	}
	for _, accept := range []string{"application/fhir+json", "application/json"} {
		res := e.do("GET", "/Binary/b1", nil, "Accept", accept)
		var b struct{ ResourceType, ContentType, Data string }
		json.Unmarshal(res.body, &b)
		if res.StatusCode != 200 || b.ResourceType != "Binary" || b.Data != base64.StdEncoding.EncodeToString(content) {
			t.Errorf("Accept %s: %d %s, want the Binary resource", accept, res.StatusCode, res.body)
		}
	}
	if res := e.do("GET", "/Binary/b1?_format=json", nil, "Accept", "text/plain"); !bytes.Contains(res.body, []byte(`"resourceType":"Binary"`)) {
		t.Errorf("_format=json: %s", res.body)
	}
}
