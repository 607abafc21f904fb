package fhir

import (
	"crypto/sha256"
	"encoding/json"
	"sort"
	"strconv"
	"unicode/utf8"

	"github.com/kiln-fhir/kiln"
)

// Encode writes m as compact JSON with elements in R4's canonical order
// (resourceType, id, meta, then as HL7 lists them). The output is the same for
// the same content whatever the input's key order, which makes hashes and
// no-op updates meaningful.
func Encode(m map[string]any) []byte {
	e := encoder{d: R4(), buf: make([]byte, 0, 1024)}
	e.resource(m)
	return e.buf
}

type encoder struct {
	d   *Definitions
	buf []byte
	// metaAt is the offset just inside the top-level "meta" object.
	metaAt    int
	metaEmpty bool
	top       bool
}

func (e *encoder) resource(m map[string]any) {
	rt, _ := m["resourceType"].(string)
	e.object(m, e.d.Types[rt])
}

func (e *encoder) object(m map[string]any, t *TypeDef) {
	e.buf = append(e.buf, '{')
	first := true
	if t == nil {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			first = e.field(first, k, m[k], nil)
		}
	} else {
		for _, p := range t.Props {
			if val, ok := m[p.Name]; ok {
				first = e.field(first, p.Name, val, p)
			}
		}
	}
	e.buf = append(e.buf, '}')
}

func (e *encoder) field(first bool, k string, val any, p *Prop) bool {
	if !first {
		e.buf = append(e.buf, ',')
	}
	e.buf = appendString(e.buf, k)
	e.buf = append(e.buf, ':')
	e.value(val, p)
	return false
}

func (e *encoder) value(val any, p *Prop) {
	switch x := val.(type) {
	case nil:
		e.buf = append(e.buf, "null"...)
	case string:
		e.buf = appendString(e.buf, x)
	case json.Number:
		e.buf = append(e.buf, x...)
	case float64:
		e.buf = strconv.AppendFloat(e.buf, x, 'g', -1, 64)
	case int:
		e.buf = strconv.AppendInt(e.buf, int64(x), 10)
	case int64:
		e.buf = strconv.AppendInt(e.buf, x, 10)
	case bool:
		e.buf = strconv.AppendBool(e.buf, x)
	case []any:
		e.buf = append(e.buf, '[')
		for i, item := range x {
			if i > 0 {
				e.buf = append(e.buf, ',')
			}
			e.value(item, p)
		}
		e.buf = append(e.buf, ']')
	case []string:
		e.buf = append(e.buf, '[')
		for i, item := range x {
			if i > 0 {
				e.buf = append(e.buf, ',')
			}
			e.buf = appendString(e.buf, item)
		}
		e.buf = append(e.buf, ']')
	case map[string]any:
		switch {
		case p == nil:
			e.object(x, nil)
		case p.Type == "ResourceList":
			e.resource(x)
		default:
			e.object(x, e.d.Types[p.Type])
		}
	default:
		b, _ := json.Marshal(x)
		e.buf = append(e.buf, b...)
	}
}

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string; unlike encoding/json it leaves <, > and &
// alone (narratives are full of them) and replaces invalid UTF-8.
func appendString(buf []byte, s string) []byte {
	buf = append(buf, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			buf = append(buf, s[start:i]...)
			switch c {
			case '"', '\\':
				buf = append(buf, '\\', c)
			case '\n':
				buf = append(buf, '\\', 'n')
			case '\r':
				buf = append(buf, '\\', 'r')
			case '\t':
				buf = append(buf, '\\', 't')
			default:
				buf = append(buf, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			buf = append(buf, s[start:i]...)
			buf = append(buf, `\ufffd`...)
			i++
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			buf = append(buf, s[start:i]...)
			buf = append(buf, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	buf = append(buf, s[start:]...)
	return append(buf, '"')
}

// AppendString appends s as a JSON string literal.
func AppendString(buf []byte, s string) []byte { return appendString(buf, s) }

// Options says how references are read.
type Options struct {
	// Bases are the absolute base URLs (e.g. http://host/4_0_0) under which an
	// absolute reference counts as a reference to this server.
	Bases []string
}

// Prepare turns a validated resource into a store write: canonical body with
// room for the server's meta, its hash, compartment membership, supporting
// references and access codes. It sets m["id"] to id.
func Prepare(p *Parsed, id string, opt Options) kiln.Write {
	m := p.Map
	m["id"] = id
	p.ID = id
	meta, _ := m["meta"].(map[string]any)
	if meta == nil {
		meta = map[string]any{}
		m["meta"] = meta
	}
	delete(meta, "versionId")
	delete(meta, "lastUpdated")
	e := encoder{d: R4(), buf: make([]byte, 0, 1024)}
	d := e.d
	t := d.Types[p.Type]
	// The resource level is written here so that the offset inside meta is known.
	e.buf = append(e.buf, '{')
	first := true
	metaAt, metaEmpty := 0, len(meta) == 0
	for _, pr := range t.Props {
		val, ok := m[pr.Name]
		if !ok {
			continue
		}
		if pr.Name == "meta" {
			if !first {
				e.buf = append(e.buf, ',')
			}
			e.buf = append(e.buf, `"meta":`...)
			// The meta object's content starts just after its '{'.
			metaAt = len(e.buf) + 1
			e.value(val, pr)
			first = false
			continue
		}
		first = e.field(first, pr.Name, val, pr)
	}
	e.buf = append(e.buf, '}')
	sum := sha256.Sum256(e.buf)
	w := kiln.Write{
		Kind:      kiln.Put,
		Type:      p.Type,
		ID:        id,
		Body:      e.buf,
		MetaAt:    metaAt,
		MetaEmpty: metaEmpty,
		Hash:      sum[:16],
	}
	refs := Extract(p.Type, id, m, opt)
	w.Patients, w.Supporting, w.PatientRefs, w.AccessCodes = refs.Patients, refs.Supporting, refs.PatientRefs, refs.AccessCodes
	return w
}

// SpliceMeta returns w's body with meta.versionId and meta.lastUpdated set.
func SpliceMeta(body []byte, metaAt int, metaEmpty bool, versionID, lastUpdated string) []byte {
	out := make([]byte, 0, len(body)+64)
	out = append(out, body[:metaAt]...)
	out = append(out, `"versionId":`...)
	out = appendString(out, versionID)
	out = append(out, `,"lastUpdated":`...)
	out = appendString(out, lastUpdated)
	if !metaEmpty {
		out = append(out, ',')
	}
	return append(out, body[metaAt:]...)
}
