package fhirpath

import (
	"encoding/json"
	"regexp"
	"sort"
	"strings"
	"unicode/utf8"
)

type function struct {
	minArgs, maxArgs int
	fn               func(c *ctx, n *node, in []Item) ([]Item, error)
}

// maxRepeat bounds what repeat() collects.
const maxRepeat = 100_000

// funcs are the supported functions; see Functions.
var funcs map[string]function

// Functions lists the names of the supported functions, sorted.
func Functions() []string {
	var out []string
	for k := range funcs {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// arg evaluates argument i of a non-iterating function: against the focus
// the enclosing expression started from, not the function's input.
func (c *ctx) arg(n *node, i int) ([]Item, error) {
	if i >= len(n.args) {
		return nil, nil
	}
	return c.eval(n.args[i], c.this)
}

// each evaluates argument 0 once per input item, with $this and $index set.
func (c *ctx) each(n *node, in []Item, f func(it Item, v []Item) error) error {
	for i, it := range in {
		sub := &ctx{env: c.env, root: c.root, this: []Item{it}, index: i}
		v, err := sub.eval(n.args[0], []Item{it})
		if err != nil {
			return err
		}
		if err := f(it, v); err != nil {
			return err
		}
	}
	return nil
}

// typeArg reads a type specifier argument (ofType(Quantity), getReferenceKey(Patient)).
func typeArg(n *node, i int) (string, error) {
	if i >= len(n.args) {
		return "", nil
	}
	a := n.args[i]
	switch a.kind {
	case nMember:
		return a.name, nil
	case nDot:
		if a.left.kind == nMember && a.right.kind == nMember {
			return a.left.name + "." + a.right.name, nil
		}
	}
	return "", evalErr(n, "%s() takes a type name", n.name)
}

func (c *ctx) stringArg(n *node, i int) (string, bool, error) {
	v, err := c.arg(n, i)
	if err != nil || len(v) == 0 {
		return "", false, err
	}
	s, ok := v[0].V.(string)
	if !ok || len(v) > 1 {
		return "", false, evalErr(n, "%s() takes a single string argument", n.name)
	}
	return s, true, nil
}

// singleString is the input of a string function: a single string, or empty.
func singleString(n *node, in []Item) (string, bool, error) {
	if len(in) == 0 {
		return "", false, nil
	}
	if len(in) > 1 {
		return "", false, evalErr(n, "%s() needs a single input item, got %d", n.name, len(in))
	}
	s, ok := in[0].V.(string)
	if !ok {
		return "", false, evalErr(n, "%s() needs a string input", n.name)
	}
	return s, true, nil
}

func stringFunc(args int, f func(c *ctx, n *node, s string) ([]Item, error)) function {
	return function{args, args, func(c *ctx, n *node, in []Item) ([]Item, error) {
		s, ok, err := singleString(n, in)
		if err != nil || !ok {
			return nil, err
		}
		return f(c, n, s)
	}}
}

func strItem(s string) []Item { return []Item{{V: s, T: "string"}} }

func init() {
	funcs = map[string]function{
		"empty": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) { return boolean(len(in) == 0), nil }},
		"hasValue": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) {
			if len(in) != 1 {
				return boolean(false), nil
			}
			_, isMap := in[0].V.(map[string]any)
			return boolean(!isMap), nil
		}},
		"exists": {0, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			if len(n.args) == 0 {
				return boolean(len(in) > 0), nil
			}
			found := false
			err := c.each(n, in, func(_ Item, v []Item) error {
				b, ok, err := boolOf(n, v)
				found = found || ok && b
				return err
			})
			return boolean(found), err
		}},
		"all": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			all := true
			err := c.each(n, in, func(_ Item, v []Item) error {
				b, ok, err := boolOf(n, v)
				all = all && ok && b
				return err
			})
			return boolean(all), err
		}},
		"allTrue":  {0, 0, boolsFunc(func(t, f, n int) bool { return t == n })},
		"anyTrue":  {0, 0, boolsFunc(func(t, f, n int) bool { return t > 0 })},
		"allFalse": {0, 0, boolsFunc(func(t, f, n int) bool { return f == n })},
		"anyFalse": {0, 0, boolsFunc(func(t, f, n int) bool { return f > 0 })},
		"count":    {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) { return []Item{intItem(int64(len(in)))}, nil }},
		"distinct": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) { return union(in, nil), nil }},
		"isDistinct": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) {
			return boolean(len(union(in, nil)) == len(in)), nil
		}},
		"where": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			var out []Item
			err := c.each(n, in, func(it Item, v []Item) error {
				b, ok, err := boolOf(n, v)
				if ok && b {
					out = append(out, it)
				}
				return err
			})
			return out, err
		}},
		"select": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			var out []Item
			err := c.each(n, in, func(_ Item, v []Item) error { out = append(out, v...); return nil })
			return out, err
		}},
		"repeat": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			// Items already found are not followed again, so repeat($this)
			// and cycles through %resource end.
			var out []Item
			for len(in) > 0 {
				var next []Item
				err := c.each(n, in, func(_ Item, v []Item) error {
					for _, it := range v {
						if len(union(out, []Item{it})) > len(out) {
							out = append(out, it)
							next = append(next, it)
						}
					}
					if len(out) > maxRepeat {
						return evalErr(n, "repeat() found more than %d items", maxRepeat)
					}
					return nil
				})
				if err != nil {
					return nil, err
				}
				in = next
			}
			return out, nil
		}},
		"first": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) { return slice(in, 0, 1), nil }},
		"last":  {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) { return slice(in, len(in)-1, len(in)), nil }},
		"tail":  {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) { return slice(in, 1, len(in)), nil }},
		"single": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) {
			if len(in) > 1 {
				return nil, evalErr(n, "single() on %d items", len(in))
			}
			return in, nil
		}},
		"skip": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			v, err := c.arg(n, 0)
			if err != nil {
				return nil, err
			}
			k, _, err := singleInt(n, v)
			return slice(in, int(max(k, 0)), len(in)), err
		}},
		"take": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			v, err := c.arg(n, 0)
			if err != nil {
				return nil, err
			}
			k, _, err := singleInt(n, v)
			return slice(in, 0, int(max(k, 0))), err
		}},
		"union": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			v, err := c.arg(n, 0)
			return union(in, v), err
		}},
		"combine": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			v, err := c.arg(n, 0)
			return append(append([]Item(nil), in...), v...), err
		}},
		"not": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) {
			b, ok, err := boolOf(n, in)
			if err != nil || !ok {
				return nil, err
			}
			return boolean(!b), nil
		}},
		"iif": {2, 3, func(c *ctx, n *node, in []Item) ([]Item, error) {
			cond, err := c.arg(n, 0)
			if err != nil {
				return nil, err
			}
			b, ok, err := boolOf(n, cond)
			if err != nil {
				return nil, err
			}
			if ok && b {
				return c.arg(n, 1)
			}
			return c.arg(n, 2)
		}},
		"ofType": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			t, err := typeArg(n, 0)
			return ofType(in, t), err
		}},
		"as": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			t, err := typeArg(n, 0)
			return ofType(in, t), err
		}},
		"is": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			t, err := typeArg(n, 0)
			if err != nil || len(in) == 0 {
				return nil, err
			}
			return boolean(len(in) == 1 && len(ofType(in, t)) == 1), nil
		}},
		"extension": {1, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			url, ok, err := c.stringArg(n, 0)
			if err != nil || !ok {
				return nil, err
			}
			var out []Item
			for _, it := range in {
				for _, e := range member(nil, it, "extension") {
					if m, _ := e.V.(map[string]any); m != nil && m["url"] == url {
						out = append(out, Item{V: m, T: "Extension"})
					}
				}
			}
			return out, nil
		}},
		"getResourceKey": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) {
			var out []Item
			for _, it := range in {
				m, _ := it.V.(map[string]any)
				rt, _ := m["resourceType"].(string)
				id, _ := m["id"].(string)
				if rt != "" && id != "" {
					out = append(out, Item{V: rt + "/" + id, T: "string"})
				}
			}
			return out, nil
		}},
		"getReferenceKey": {0, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			want, err := typeArg(n, 0)
			if err != nil {
				return nil, err
			}
			want = strings.TrimPrefix(want, "FHIR.")
			var out []Item
			for _, it := range in {
				m, _ := it.V.(map[string]any)
				ref, _ := m["reference"].(string)
				typ, id, ok := ReferenceKey(ref)
				if ok && (want == "" || want == typ) {
					out = append(out, Item{V: typ + "/" + id, T: "string"})
				}
			}
			return out, nil
		}},
		"join": {0, 1, func(c *ctx, n *node, in []Item) ([]Item, error) {
			sep, _, err := c.stringArg(n, 0)
			if err != nil {
				return nil, err
			}
			parts := make([]string, 0, len(in))
			for _, it := range in {
				s, ok := toString(it)
				if !ok {
					return nil, evalErr(n, "join() takes strings")
				}
				parts = append(parts, s)
			}
			return strItem(strings.Join(parts, sep)), nil
		}},
		"toString": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) {
			if len(in) != 1 {
				return nil, nil
			}
			if s, ok := toString(in[0]); ok {
				return strItem(s), nil
			}
			return nil, nil
		}},
		"toInteger": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) {
			if len(in) != 1 {
				return nil, nil
			}
			s, _ := toString(in[0])
			if i, _, isInt, ok := number(Item{V: json.Number(s)}); ok && isInt {
				return []Item{intItem(i)}, nil
			}
			if b, ok := in[0].V.(bool); ok {
				return []Item{intItem(map[bool]int64{true: 1}[b])}, nil
			}
			return nil, nil
		}},
		"toDecimal": {0, 0, func(c *ctx, n *node, in []Item) ([]Item, error) {
			if len(in) != 1 {
				return nil, nil
			}
			s, _ := toString(in[0])
			if _, f, _, ok := number(Item{V: json.Number(s)}); ok {
				return []Item{decItem(f)}, nil
			}
			return nil, nil
		}},
		"startsWith": stringFunc(1, func(c *ctx, n *node, s string) ([]Item, error) {
			p, ok, err := c.stringArg(n, 0)
			if err != nil || !ok {
				return nil, err
			}
			return boolean(strings.HasPrefix(s, p)), nil
		}),
		"endsWith": stringFunc(1, func(c *ctx, n *node, s string) ([]Item, error) {
			p, ok, err := c.stringArg(n, 0)
			if err != nil || !ok {
				return nil, err
			}
			return boolean(strings.HasSuffix(s, p)), nil
		}),
		"contains": stringFunc(1, func(c *ctx, n *node, s string) ([]Item, error) {
			p, ok, err := c.stringArg(n, 0)
			if err != nil || !ok {
				return nil, err
			}
			return boolean(strings.Contains(s, p)), nil
		}),
		"indexOf": stringFunc(1, func(c *ctx, n *node, s string) ([]Item, error) {
			p, ok, err := c.stringArg(n, 0)
			if err != nil || !ok {
				return nil, err
			}
			i := strings.Index(s, p)
			if i > 0 {
				i = utf8.RuneCountInString(s[:i])
			}
			return []Item{intItem(int64(i))}, nil
		}),
		"substring": {1, 2, func(c *ctx, n *node, in []Item) ([]Item, error) {
			s, ok, err := singleString(n, in)
			if err != nil || !ok {
				return nil, err
			}
			sv, err := c.arg(n, 0)
			if err != nil {
				return nil, err
			}
			start, ok, err := singleInt(n, sv)
			r := []rune(s)
			if err != nil || !ok || start < 0 || start >= int64(len(r)) {
				return nil, err
			}
			end := int64(len(r))
			if len(n.args) > 1 {
				lv, err := c.arg(n, 1)
				if err != nil {
					return nil, err
				}
				if l, ok, err := singleInt(n, lv); err != nil {
					return nil, err
				} else if ok {
					end = min(end, start+max(l, 0))
				}
			}
			return strItem(string(r[start:end])), nil
		}},
		"upper": stringFunc(0, func(c *ctx, n *node, s string) ([]Item, error) { return strItem(strings.ToUpper(s)), nil }),
		"lower": stringFunc(0, func(c *ctx, n *node, s string) ([]Item, error) { return strItem(strings.ToLower(s)), nil }),
		"trim":  stringFunc(0, func(c *ctx, n *node, s string) ([]Item, error) { return strItem(strings.TrimSpace(s)), nil }),
		"length": stringFunc(0, func(c *ctx, n *node, s string) ([]Item, error) {
			return []Item{intItem(int64(utf8.RuneCountInString(s)))}, nil
		}),
		"replace": stringFunc(2, func(c *ctx, n *node, s string) ([]Item, error) {
			from, ok1, err := c.stringArg(n, 0)
			if err != nil {
				return nil, err
			}
			to, ok2, err := c.stringArg(n, 1)
			if err != nil || !ok1 || !ok2 {
				return nil, err
			}
			return strItem(strings.ReplaceAll(s, from, to)), nil
		}),
		"matches": stringFunc(1, func(c *ctx, n *node, s string) ([]Item, error) {
			p, ok, err := c.stringArg(n, 0)
			if err != nil || !ok {
				return nil, err
			}
			re, err := regexp.Compile(p)
			if err != nil {
				return nil, evalErr(n, "matches(): bad regular expression: %v", err)
			}
			return boolean(re.MatchString(s)), nil
		}),
		"split": stringFunc(1, func(c *ctx, n *node, s string) ([]Item, error) {
			sep, ok, err := c.stringArg(n, 0)
			if err != nil || !ok {
				return nil, err
			}
			var out []Item
			for _, p := range strings.Split(s, sep) {
				out = append(out, Item{V: p, T: "string"})
			}
			return out, nil
		}),
		"lowBoundary":  {0, 1, func(c *ctx, n *node, in []Item) ([]Item, error) { return boundary(n, in, false) }},
		"highBoundary": {0, 1, func(c *ctx, n *node, in []Item) ([]Item, error) { return boundary(n, in, true) }},
	}
}

func boolsFunc(f func(t, fl, n int) bool) func(c *ctx, n *node, in []Item) ([]Item, error) {
	return func(c *ctx, n *node, in []Item) ([]Item, error) {
		t, fl := 0, 0
		for _, it := range in {
			b, ok := it.V.(bool)
			if !ok {
				return nil, evalErr(n, "%s() takes booleans", n.name)
			}
			if b {
				t++
			} else {
				fl++
			}
		}
		return boolean(f(t, fl, len(in))), nil
	}
}

func slice(in []Item, from, to int) []Item {
	from, to = max(from, 0), min(to, len(in))
	if from >= to {
		return nil
	}
	return in[from:to]
}

// ReferenceKey reads the type and id of a literal reference: Type/id,
// Type/id/_history/v, or an absolute URL ending so. Contained (#x) and
// logical references have none.
func ReferenceKey(ref string) (typ, id string, ok bool) {
	if ref == "" || strings.HasPrefix(ref, "#") {
		return "", "", false
	}
	if i := strings.Index(ref, "/_history/"); i >= 0 {
		ref = ref[:i]
	}
	parts := strings.Split(ref, "/")
	if len(parts) < 2 {
		return "", "", false
	}
	typ, id = parts[len(parts)-2], parts[len(parts)-1]
	if !isUpper(typ) || id == "" {
		return "", "", false
	}
	return typ, id, true
}
