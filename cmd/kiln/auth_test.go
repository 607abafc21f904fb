package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-jose/go-jose/v4"

	"github.com/kiln-fhir/kiln/auth"
)

func TestServeRefusesOpenBindWithoutAuth(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	a := authFlags{mode: "none"}
	if err := a.checkBind("127.0.0.1:8080", log); err != nil {
		t.Errorf("loopback: %v", err)
	}
	if err := a.checkBind("localhost:8080", log); err != nil {
		t.Errorf("localhost: %v", err)
	}
	if err := a.checkBind("0.0.0.0:8080", log); err == nil || !strings.Contains(err.Error(), "without authentication") {
		t.Errorf("0.0.0.0 without auth: %v", err)
	}
	a.insecureNoAuth = true
	if err := a.checkBind("0.0.0.0:8080", log); err != nil {
		t.Errorf("--insecure-no-auth: %v", err)
	}
	a = authFlags{mode: "jwt"}
	if err := a.checkBind("0.0.0.0:8080", log); err != nil {
		t.Errorf("jwt on 0.0.0.0: %v", err)
	}
	if code, _, errOut := runCLI(t, "serve", "--addr", "0.0.0.0:0", "--data", t.TempDir()); code != 1 || !strings.Contains(errOut, "refusing to serve") {
		t.Errorf("kiln serve on 0.0.0.0: %d %q", code, errOut)
	}
}

func TestClientAndTokenCommands(t *testing.T) {
	data := t.TempDir()
	k, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: k.Public(), KeyID: "c1", Algorithm: "ES384"}}})
	f := filepath.Join(t.TempDir(), "client.jwks")
	os.WriteFile(f, jwks, 0o600)
	if code, out, errOut := runCLI(t, "client", "add", "--data", data, "--id", "c1", "--jwks-file", f, "--scope", "system/*.read access/a.read"); code != 0 || !strings.Contains(out, "registered") {
		t.Fatalf("client add: %d %q %q", code, out, errOut)
	}
	if code, out, _ := runCLI(t, "client", "list", "--data", data); code != 0 || !strings.Contains(out, "c1") || !strings.Contains(out, "access/a.read") {
		t.Fatalf("client list: %q", out)
	}
	if code, _, errOut := runCLI(t, "client", "add", "--data", data, "--id", "c2", "--scope", "x"); code != 1 || !strings.Contains(errOut, "jwks") {
		t.Fatalf("client add without keys: %q", errOut)
	}
	// Issue 18, finding 8: a key too weak to trust is refused at registration.
	weak := filepath.Join(t.TempDir(), "weak.jwks")
	os.WriteFile(weak, []byte(`{"keys":[{"kty":"RSA","kid":"w","n":"AaWL","e":"AQAB"}]}`), 0o600)
	if code, _, errOut := runCLI(t, "client", "add", "--data", data, "--id", "weak", "--jwks-file", weak, "--scope", "system/*.rs"); code != 1 || !strings.Contains(errOut, "too weak") {
		t.Errorf("client add with a 17-bit RSA key: %d %q", code, errOut)
	}
	if code, _, errOut := runCLI(t, "client", "add", "--data", data, "--id", "c3", "--jwks-file", f, "--scope", "system/*.rs openid"); code != 1 || !strings.Contains(errOut, "openid") {
		t.Errorf("client add with a scope Kiln cannot grant: %d %q", code, errOut)
	}
	if code, out, _ := runCLI(t, "client", "remove", "--data", data, "--id", "c1"); code != 0 || !strings.Contains(out, "removed") {
		t.Fatalf("client remove: %q", out)
	}
	if code, _, errOut := runCLI(t, "client", "remove", "--data", data, "--id", "c1"); code != 1 || !strings.Contains(errOut, "not registered") {
		t.Fatalf("second remove: %q", errOut)
	}
	// kiln token mints with the data folder's key a token the server verifies.
	code, out, errOut := runCLI(t, "token", "--data", data, "--public-url", "http://127.0.0.1:9999", "--scope", "system/Patient.read access/a.read", "--sub", "dev1")
	if code != 0 {
		t.Fatalf("token: %q", errOut)
	}
	key, err := auth.LoadOrCreateKey(filepath.Join(data, "auth", "signing-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	v, _ := auth.NewVerifier(auth.Config{Issuer: "http://127.0.0.1:9999/4_0_0", Key: key})
	p, err := v.Verify(context.Background(), strings.TrimSpace(out))
	if err != nil || p.Name != "dev1" || !p.CanRead("Patient") || p.CanRead("Observation") {
		t.Fatalf("minted token: %v %+v", err, p)
	}
	// With a shared secret: an HS256 token the secret's verifier accepts.
	secret := filepath.Join(t.TempDir(), "secret")
	os.WriteFile(secret, []byte(strings.Repeat("s", 40)), 0o600)
	code, out, _ = runCLI(t, "token", "--data", data, "--auth-secret-file", secret, "--sub", "dev2")
	sv, _ := auth.NewVerifier(auth.Config{Issuer: "http://127.0.0.1:8080/4_0_0", Key: key, SecretFile: secret})
	if p, err := sv.Verify(context.Background(), strings.TrimSpace(out)); code != 0 || err != nil || p.Name != "dev2" {
		t.Fatalf("HS256 token: %d %v", code, err)
	}
}

// TestPublicURLIsNeverTheHostHeader (issue 17): beyond loopback kiln serve
// refuses to start without --public-url; on loopback the URLs it hands out
// are its own address's, whatever Host header a client sends.
func TestPublicURLIsNeverTheHostHeader(t *testing.T) {
	if code, _, errOut := runCLI(t, "serve", "--addr", "0.0.0.0:0", "--insecure-no-auth", "--data", t.TempDir()); code != 1 || !strings.Contains(errOut, "--public-url is required") {
		t.Errorf("beyond loopback without --public-url: %d %q", code, errOut)
	}
	if code, _, errOut := runCLI(t, "serve", "--metrics-addr", "0.0.0.0:0", "--data", t.TempDir()); code != 1 || !strings.Contains(errOut, "must be a loopback address") {
		t.Errorf("--metrics-addr beyond loopback: %d %q", code, errOut)
	}
	k := &kilnProc{t: t, bin: buildKiln(t), args: []string{"--data", t.TempDir(), "--log-level", "error"}}
	k.start()
	defer k.stop()
	req, _ := http.NewRequest("GET", k.base()+"/$export", nil)
	req.Host = "evil.example"
	req.Header.Set("Prefer", "respond-async")
	req.Header.Set("Accept", "application/fhir+json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if loc := res.Header.Get("Content-Location"); res.StatusCode != 202 || !strings.HasPrefix(loc, "http://"+k.addr+"/") {
		t.Errorf("kick-off with a forged Host: %d, Content-Location %q, want one on %s", res.StatusCode, loc, k.addr)
	}
}
