// Package ingest turns client input into store writes: transaction and batch
// Bundles (shared by the REST API and the importer) and bulk loading of
// NDJSON, NDJSON.gz and Bundle files.
package ingest

import (
	"fmt"
	"strings"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// Entry is one Bundle entry, prepared.
type Entry struct {
	Index   int
	Method  string
	Write   kiln.Write
	FullURL string
	// Err is set for an entry that cannot be processed.
	Err error
}

// BundleOptions says how a Bundle is read.
type BundleOptions struct {
	Ref fhir.Options
	// NewID mints server ids for POST entries.
	NewID func() string
	// KeepIDs makes a POST entry that carries an id an upsert of that id, so
	// that loading the same files twice leaves the same data (kiln import).
	KeepIDs bool
}

// PrepareBundle reads a batch or transaction Bundle (or, for loading, a
// collection/searchset one) into writes. urn:uuid: and urn:oid: fullUrls of
// POST entries are given ids and every reference to them is rewritten to Type/id.
func PrepareBundle(b map[string]any, opt BundleOptions) (kind string, entries []Entry, err error) {
	if rt, _ := b["resourceType"].(string); rt != "Bundle" {
		return "", nil, kiln.Invalid("resourceType", "expected a Bundle, got %q", rt)
	}
	kind, _ = b["type"].(string)
	raw, _ := b["entry"].([]any)
	if _, ok := b["entry"]; ok && raw == nil {
		return kind, nil, kiln.Invalid("Bundle.entry", "Bundle.entry must be an array")
	}
	// First pass: ids for every entry, so references can be rewritten.
	rewrite := map[string]string{}
	entries = make([]Entry, len(raw))
	resources := make([]map[string]any, len(raw))
	for i, e := range raw {
		path := fmt.Sprintf("Bundle.entry[%d]", i)
		en := Entry{Index: i}
		em, ok := e.(map[string]any)
		if !ok {
			en.Err = kiln.Invalid(path, "%s must be an object", path)
			entries[i] = en
			continue
		}
		en.FullURL, _ = em["fullUrl"].(string)
		req, _ := em["request"].(map[string]any)
		method, url := "PUT", ""
		if req != nil {
			method, _ = req["method"].(string)
			url, _ = req["url"].(string)
			// Conditional requests Kiln does not carry out are refused, not
			// ignored: ignoring ifNoneExist would create a duplicate, and
			// ignoring ifMatch would overwrite a newer version.
			for _, cond := range []string{"ifNoneExist", "ifMatch", "ifNoneMatch", "ifModifiedSince"} {
				if _, ok := req[cond]; ok && en.Err == nil {
					en.Err = kiln.Invalid(path+".request."+cond, "%s.request.%s is not supported in a Bundle: send the entry without it", path, cond)
				}
			}
			if en.Err != nil {
				entries[i] = en
				continue
			}
		} else if kind == "transaction" || kind == "batch" {
			en.Err = kiln.Invalid(path+".request", "%s.request is required in a %s Bundle", path, kind)
			entries[i] = en
			continue
		}
		en.Method = strings.ToUpper(method)
		res, _ := em["resource"].(map[string]any)
		switch en.Method {
		case "POST", "PUT":
			if res == nil {
				en.Err = kiln.Invalid(path+".resource", "%s.resource is required for %s", path, en.Method)
				break
			}
			resources[i] = res
			rt, _ := res["resourceType"].(string)
			id, _ := res["id"].(string)
			if en.Method == "PUT" {
				t, pid, ok := splitTypeID(url)
				if req != nil && !ok {
					en.Err = kiln.Invalid(path+".request.url", "%s.request.url must be Type/id for PUT, got %q", path, url)
					break
				}
				if ok {
					if t != rt {
						en.Err = kiln.Invalid(path+".request.url", "%s.request.url names %s but the resource is a %s", path, t, rt)
						break
					}
					if id != "" && id != pid {
						en.Err = kiln.Invalid(path+".resource.id", "%s.resource.id %q does not match request.url %q", path, id, url)
						break
					}
					id = pid
				}
				if id == "" {
					en.Err = kiln.Invalid(path+".resource.id", "%s has no id to PUT", path)
					break
				}
			} else if id == "" || !opt.KeepIDs {
				id = opt.NewID()
			}
			en.Write = kiln.Write{Type: rt, ID: id}
			if en.FullURL != "" && rt != "" {
				rewrite[en.FullURL] = rt + "/" + id
			}
		case "DELETE":
			t, id, ok := splitTypeID(url)
			if !ok {
				en.Err = kiln.Invalid(path+".request.url", "%s.request.url must be Type/id for DELETE, got %q", path, url)
				break
			}
			en.Write = kiln.Write{Kind: kiln.Delete, Type: t, ID: id}
		default:
			en.Err = kiln.Invalid(path+".request.method", "%s.request.method %q is not supported (POST, PUT, DELETE)", path, method)
		}
		entries[i] = en
	}
	for i := range entries {
		en := &entries[i]
		res := resources[i]
		if en.Err != nil || res == nil {
			continue
		}
		if len(rewrite) > 0 {
			rewriteRefs(res, rewrite)
		}
		if u := unresolvedURN(res); u != "" {
			en.Err = kiln.Invalid(fmt.Sprintf("Bundle.entry[%d].resource", i), "Bundle.entry[%d].resource refers to %s, which no entry of the Bundle defines", i, u)
			continue
		}
		p, err := fhir.FromMap(res)
		if err != nil {
			en.Err = prefixError(err, fmt.Sprintf("Bundle.entry[%d].resource", i))
			continue
		}
		kindW := kiln.Put
		if en.Method == "POST" && !opt.KeepIDs {
			kindW = kiln.Create
		}
		w := fhir.Prepare(p, en.Write.ID, opt.Ref)
		w.Kind = kindW
		en.Write = w
	}
	return kind, entries, nil
}

func prefixError(err error, prefix string) error {
	if e, ok := err.(*kiln.Error); ok {
		out := *e
		out.Message = prefix + ": " + e.Message
		for i, x := range out.Expression {
			out.Expression[i] = prefix + "." + x
		}
		return &out
	}
	return err
}

func splitTypeID(url string) (string, string, bool) {
	url = strings.TrimPrefix(url, "/")
	t, id, ok := strings.Cut(url, "/")
	if !ok || strings.ContainsAny(id, "/?") || !fhir.R4().IsResourceType(t) || !fhir.ValidID(id) {
		return "", "", false
	}
	return t, id, true
}

// rewriteRefs replaces references to Bundle-local fullUrls.
func rewriteRefs(v any, to map[string]string) {
	switch x := v.(type) {
	case []any:
		for _, item := range x {
			rewriteRefs(item, to)
		}
	case map[string]any:
		for k, val := range x {
			if s, ok := val.(string); ok {
				if k == "reference" {
					if r, ok := to[s]; ok {
						x[k] = r
					}
				}
				continue
			}
			rewriteRefs(val, to)
		}
	}
}

// unresolvedURN returns a urn:uuid: or urn:oid: reference left in v (after
// rewriting, such a reference points at nothing), or "".
func unresolvedURN(v any) string {
	switch x := v.(type) {
	case []any:
		for _, item := range x {
			if u := unresolvedURN(item); u != "" {
				return u
			}
		}
	case map[string]any:
		for k, val := range x {
			if s, ok := val.(string); ok {
				if k == "reference" && (strings.HasPrefix(s, "urn:uuid:") || strings.HasPrefix(s, "urn:oid:")) {
					return s
				}
				continue
			}
			if u := unresolvedURN(val); u != "" {
				return u
			}
		}
	}
	return ""
}
