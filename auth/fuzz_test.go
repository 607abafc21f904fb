package auth

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
)

// FuzzVerify: bearer token parsing never panics, never accepts a token that
// Kiln did not sign, and every refusal is a 401-class error.
func FuzzVerify(f *testing.F) {
	key, err := LoadOrCreateKey(filepath.Join(f.TempDir(), "k.pem"))
	if err != nil {
		f.Fatal(err)
	}
	v, err := NewVerifier(Config{Issuer: "https://kiln.test/4_0_0", Key: key})
	if err != nil {
		f.Fatal(err)
	}
	good, _ := v.Mint("u", "system/*.read access/*.read", time.Minute, nil)
	f.Add(good)
	f.Add("")
	f.Add("a.b.c")
	f.Add("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.")
	f.Add(good[:len(good)-5] + "AAAAA")
	f.Fuzz(func(t *testing.T, tok string) {
		p, err := v.Verify(context.Background(), tok)
		if err != nil {
			if kiln.ErrorCode(err) != kiln.EUNAUTHORIZED {
				t.Fatalf("refusal with code %s: %v", kiln.ErrorCode(err), err)
			}
			return
		}
		// Only the real token (or a re-encoding of its exact signed bytes) may pass.
		if !strings.HasPrefix(tok, good[:strings.LastIndex(good, ".")]) || p.Name != "u" {
			t.Fatalf("accepted a token Kiln did not issue: %q", tok)
		}
	})
}
