package pull

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"

	"github.com/go-jose/go-jose/v4"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestRunIDsNeverCollide: a second run started in the same second as the
// previous one gets its own name (once it overwrote the first run's files).
func TestRunIDsNeverCollide(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	first := newRunID(dir, now)
	os.WriteFile(filepath.Join(dir, "Patient."+first+".001.ndjson"), nil, 0o644)
	second := newRunID(dir, now.Add(300*time.Millisecond))
	os.WriteFile(filepath.Join(dir, "deleted."+second+".001.ndjson"), nil, 0o644)
	third := newRunID(dir, now.Add(600*time.Millisecond))
	if first != "20261127T100000" || second != first+"-2" || third != first+"-3" {
		t.Fatalf("run ids %q %q %q", first, second, third)
	}
	if got := newRunID(dir, now.Add(time.Second)); got != "20261127T100001" {
		t.Fatalf("next second: %q", got)
	}
}

// TestPEMKeyGetsThumbprintKid: a PEM key without --key-id signs with the
// RFC 7638 thumbprint as kid, never an empty one.
func TestPEMKeyGetsThumbprintKid(t *testing.T) {
	k, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(k)
	path := filepath.Join(t.TempDir(), "k.pem")
	os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	_, kid, err := LoadKey(path)
	tp, _ := (&jose.JSONWebKey{Key: k.Public()}).Thumbprint(crypto.SHA256)
	if err != nil || kid == "" || kid != base64.RawURLEncoding.EncodeToString(tp) {
		t.Fatalf("kid %q, err %v", kid, err)
	}
}

func TestDefaultScope(t *testing.T) {
	for _, c := range []struct{ cfg, want string }{
		{`{"capabilities":["permission-v2"]}`, "system/*.rs"},
		{`{"scopes_supported":["system/*.rs"]}`, "system/*.rs"},
		{`{"capabilities":["permission-v1","permission-v2"],"scopes_supported":["system/*.read","access/*.read"]}`, "system/*.read"},
		{`{}`, "system/*.read"},
	} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, c.cfg) }))
		if got := DefaultScope(context.Background(), srv.Client(), srv.URL+"/fhir"); got != c.want {
			t.Errorf("%s: %q, want %q", c.cfg, got, c.want)
		}
		srv.Close()
	}
}
