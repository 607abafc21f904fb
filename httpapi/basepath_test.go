package httpapi_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln"
)

// TestBasePaths (issue 19, finding 5): every form of base path serves the
// whole API under it — the default, a nested one written with a trailing
// slash, and the root, where the seed's literal /$export and
// /Patient/$export must work. A standard client finds the token endpoint,
// exports, follows Content-Location and the manifest, and reads a resource.
func TestBasePaths(t *testing.T) {
	data := dataDir(t, "synthea-r4-10")
	for _, tc := range []struct {
		name, basePath, want string
	}{
		{"default", "", "/4_0_0"},
		{"nested", "/fhir/r4/", "/fhir/r4"},
		{"root", "/", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newAuthEnv(t, envOpts{tenancy: kiln.TenancyNone, basePath: tc.basePath})
			if r.base != r.root+tc.want {
				t.Fatalf("env base %s", r.base)
			}
			r.load(data)
			c, jwks := newSmartClient(t, r.base, "base-path-client")
			if err := r.db.(kiln.ClientStore).PutClient(context.Background(), &kiln.Client{ID: c.id, JWKS: jwks, Scope: "system/*.rs"}); err != nil {
				t.Fatal(err)
			}
			tok := c.token(c.discover(), "system/*.rs").AccessToken
			auth := []string{"Authorization", "Bearer " + tok}

			res, body := c.get(r.base+"/metadata", "Accept", "application/fhir+json")
			var cs struct {
				Implementation struct{ URL string } `json:"implementation"`
			}
			if json.Unmarshal(body, &cs); res.StatusCode != 200 || cs.Implementation.URL != r.base {
				t.Errorf("metadata: %d, implementation.url %q, want %q", res.StatusCode, cs.Implementation.URL, r.base)
			}
			for _, path := range []string{"/$export", "/Patient/$export"} {
				res, body := c.get(r.base+path, append([]string{"Accept", "application/fhir+json", "Prefer", "respond-async"}, auth...)...)
				loc := res.Header.Get("Content-Location")
				if res.StatusCode != 202 || !strings.HasPrefix(loc, r.base+"/$export/") {
					t.Fatalf("kick-off %s: %d, Content-Location %q: %s", path, res.StatusCode, loc, body)
				}
				m := c.await(loc, tok)
				for _, o := range m.Output {
					if !strings.HasPrefix(o.URL, loc+"/file/") {
						t.Errorf("%s: output URL %s is not under %s", path, o.URL, loc)
					}
				}
				got := c.download(m, tok)
				if len(got) == 0 {
					t.Fatalf("%s exported nothing", path)
				}
				for ref := range got {
					if !strings.HasPrefix(ref, "Patient/") {
						continue
					}
					if res, body := c.get(r.base+"/"+ref, append([]string{"Accept", "application/fhir+json"}, auth...)...); res.StatusCode != 200 {
						t.Errorf("read %s: %d %s", ref, res.StatusCode, body)
					}
					break
				}
				c.cancel(loc, tok)
			}
			// The server's own endpoints stay where they are, whatever the base.
			if res, _ := c.get(r.root + "/healthz"); res.StatusCode != 200 {
				t.Errorf("/healthz: %d", res.StatusCode)
			}
			if res, body := c.get(r.root + "/auth/token"); res.StatusCode != 405 {
				t.Errorf("GET /auth/token: %d %s, want 405", res.StatusCode, body)
			}
			if res, body := c.get(r.base+"/NoSuchType", auth...); res.StatusCode != 404 || !strings.Contains(string(body), "OperationOutcome") {
				t.Errorf("unknown type: %d %s", res.StatusCode, body)
			}
		})
	}
}
