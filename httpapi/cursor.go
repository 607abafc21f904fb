package httpapi

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/kiln-fhir/kiln"
)

// Search cursors are opaque: a store row id says how many records of every
// tenant were written before it, so the cursor a client sees is the row id
// encrypted — one AES block of the id and eight bytes binding it to the
// search's type and tenants — with a key kept in the store, so that every
// API server sharing it reads the others'. A value that does not decrypt to
// that shape for this search is refused: none can be made without the key,
// and one from another type's or another tenant's search does not fit.

// cursorBlock returns the cursor cipher, reading its key on first use.
func (s *Server) cursorBlock(ctx context.Context) (cipher.Block, error) {
	s.cursorMu.Lock()
	defer s.cursorMu.Unlock()
	if s.cursors != nil {
		return s.cursors, nil
	}
	key, err := s.store.Secret(ctx, "search-cursor", 16)
	if err != nil {
		return nil, err
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("cursor key: %w", err)
	}
	s.cursors = b
	return b, nil
}

// cursorScope is the eight bytes binding a cursor to a search: its type
// and the caller's tenants (nil: every tenant).
func cursorScope(typ string, tenants []string) []byte {
	h := sha256.Sum256([]byte(typ + "\x00" + strings.Join(tenants, "\x00")))
	return h[:8]
}

// encodeCursor makes the _cursor value for row id rid of a search of scope.
func (s *Server) encodeCursor(ctx context.Context, rid int64, scope []byte) (string, error) {
	b, err := s.cursorBlock(ctx)
	if err != nil {
		return "", err
	}
	var plain, sealed [aes.BlockSize]byte
	binary.BigEndian.PutUint64(plain[:8], uint64(rid))
	copy(plain[8:], scope)
	b.Encrypt(sealed[:], plain[:])
	return base64.RawURLEncoding.EncodeToString(sealed[:]), nil
}

// decodeCursor reads a _cursor value this server (or another sharing its
// store) gave out for a search of scope.
func (s *Server) decodeCursor(ctx context.Context, v string, scope []byte) (int64, error) {
	sealed, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil || len(sealed) != aes.BlockSize {
		return 0, kiln.Invalid("_cursor", "_cursor %q is not one this server gave out", v)
	}
	b, err := s.cursorBlock(ctx)
	if err != nil {
		return 0, err
	}
	var plain [aes.BlockSize]byte
	b.Decrypt(plain[:], sealed)
	rid := int64(binary.BigEndian.Uint64(plain[:8]))
	if !bytes.Equal(plain[8:], scope) || rid < 0 {
		return 0, kiln.Invalid("_cursor", "_cursor %q is not one this server gave out", v)
	}
	return rid, nil
}
