package fhir

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-fhir/kiln"
)

// Clause is one search parameter of a query: its values are ORed.
type Clause struct {
	Param    *Param
	Code     string
	Modifier string
	Values   []string
}

// Query is a FHIR search on one type: its clauses are ANDed.
type Query struct {
	Type    string
	Clauses []Clause
	// Now anchors the ap (approximately) prefix; zero means time.Now().
	Now time.Time
}

// resultParams change what a search returns rather than what matches.
var resultParams = map[string]bool{
	"_include": true, "_revinclude": true, "_sort": true, "_count": true, "_elements": true,
	"_summary": true, "_total": true, "_contained": true, "_containedType": true, "_format": true, "_cursor": true,
}

var modifiersByType = map[string][]string{
	"token":     {"not", "text", "missing"},
	"reference": {"missing"},
	"date":      {"missing"},
	"string":    {"exact", "contains", "missing"},
	"quantity":  {"missing"},
	"number":    {"missing"},
	"uri":       {"below", "missing"},
}

// ParseQuery reads search parameters of type typ. Result parameters are left
// to the caller when allowResult is true, and refused otherwise (_typeFilter).
// Every problem is an EINVALID error naming the parameter.
func ParseQuery(typ string, params url.Values, allowResult bool) (*Query, error) {
	if !R4().IsResourceType(typ) {
		return nil, kiln.Invalid("type", "%q is not an R4 resource type", typ)
	}
	q := &Query{Type: typ}
	names := make([]string, 0, len(params))
	for n := range params {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, raw := range names {
		code, mod, _ := strings.Cut(raw, ":")
		if resultParams[code] {
			if allowResult {
				continue
			}
			return nil, kiln.Invalid(raw, "%s is a result parameter and cannot filter %s", code, typ)
		}
		p := LookupParam(typ, code)
		if p == nil {
			return nil, kiln.Invalid(raw, "%s has no supported search parameter %q", typ, code)
		}
		// A type modifier on a reference (subject:Patient=x) is the same as
		// the value Patient/x.
		typeMod := ""
		if p.Type == "reference" && R4().IsResourceType(mod) {
			if len(p.Targets) > 0 && !slices.Contains(p.Targets, mod) {
				return nil, kiln.Invalid(raw, "%s of %s cannot refer to a %s (targets: %s)", code, typ, mod, strings.Join(p.Targets, ", "))
			}
			typeMod, mod = mod, ""
		}
		if mod != "" && !slices.Contains(modifiersByType[p.Type], mod) {
			return nil, kiln.Invalid(raw, "modifier :%s is not supported on %s parameter %s", mod, p.Type, code)
		}
		for _, v := range params[raw] {
			c := Clause{Param: p, Code: code, Modifier: mod}
			for _, part := range splitValues(v) {
				if err := checkValue(p, mod, part); err != nil {
					return nil, kiln.Invalid(raw, "%s=%s: %v", raw, v, err)
				}
				if typeMod != "" {
					if strings.Contains(part, "/") {
						return nil, kiln.Invalid(raw, "%s=%s: with a type modifier, give the id alone", raw, v)
					}
					part = typeMod + "/" + part
				}
				c.Values = append(c.Values, part)
			}
			if len(c.Values) == 0 {
				return nil, kiln.Invalid(raw, "%s has no value", raw)
			}
			q.Clauses = append(q.Clauses, c)
		}
	}
	return q, nil
}

// splitValues splits on commas that are not escaped with a backslash.
func splitValues(v string) []string {
	var out []string
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		switch {
		case v[i] == '\\' && i+1 < len(v):
			b.WriteByte(v[i+1])
			i++
		case v[i] == ',':
			out = append(out, b.String())
			b.Reset()
		default:
			b.WriteByte(v[i])
		}
	}
	return append(out, b.String())
}

var prefixes = []string{"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"}

func splitPrefix(v string) (string, string) {
	if len(v) > 2 && slices.Contains(prefixes, v[:2]) && (v[2] == '-' || v[2] == '.' || (v[2] >= '0' && v[2] <= '9')) {
		return v[:2], v[2:]
	}
	return "eq", v
}

func checkValue(p *Param, mod, v string) error {
	if mod == "missing" {
		if v != "true" && v != "false" {
			return fmt.Errorf(":missing takes true or false")
		}
		return nil
	}
	if v == "" {
		return fmt.Errorf("empty value")
	}
	switch p.Type {
	case "date":
		_, d := splitPrefix(v)
		_, _, _, err := ParseDateTime(d)
		return err
	case "number":
		_, n := splitPrefix(v)
		_, err := strconv.ParseFloat(n, 64)
		return err
	case "quantity":
		_, rest := splitPrefix(v)
		num, _, _ := strings.Cut(rest, "|")
		_, err := strconv.ParseFloat(num, 64)
		return err
	}
	return nil
}

// Match reports whether a decoded resource satisfies every clause.
func (q *Query) Match(res map[string]any) bool {
	for i := range q.Clauses {
		if !q.matchClause(&q.Clauses[i], res) {
			return false
		}
	}
	return true
}

// MatchJSON decodes body and matches it.
func (q *Query) MatchJSON(body []byte) (bool, error) {
	m, err := DecodeJSON(body)
	if err != nil {
		return false, err
	}
	return q.Match(m), nil
}

// DecodeJSON decodes a stored resource for matching, numbers kept exact as
// json.Number (as Match expects).
func DecodeJSON(body []byte) (map[string]any, error) {
	var m map[string]any
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	return m, nil
}

// MatchAny reports whether res matches one of qs: several filters for one
// type (_typeFilter, or a token's filtered scopes) are ORed.
func MatchAny(qs []*Query, res map[string]any) bool {
	for _, q := range qs {
		if q.Match(res) {
			return true
		}
	}
	return false
}

func (q *Query) matchClause(c *Clause, res map[string]any) bool {
	nodes := c.Param.Values(res)
	if c.Modifier == "missing" {
		return (len(nodes) == 0) == (c.Values[0] == "true")
	}
	if c.Modifier == "not" {
		for _, v := range c.Values {
			for _, n := range nodes {
				if matchToken(n, v, "") {
					return false
				}
			}
		}
		return true
	}
	for _, v := range c.Values {
		for _, n := range nodes {
			if q.matchValue(c, n, v) {
				return true
			}
		}
	}
	return false
}

func (q *Query) matchValue(c *Clause, node any, v string) bool {
	switch c.Param.Type {
	case "token":
		return matchToken(node, v, c.Modifier)
	case "reference":
		return matchReference(node, v)
	case "date":
		return q.matchDate(node, v)
	case "string":
		return matchString(node, v, c.Modifier)
	case "number":
		f, ok := number(node)
		return ok && matchNumber(f, v)
	case "quantity":
		return matchQuantity(node, v)
	case "uri":
		s, _ := node.(string)
		if c.Modifier == "below" {
			return strings.HasPrefix(s, v)
		}
		return s == v
	}
	return false
}

func str(m map[string]any, k string) string {
	s, _ := m[k].(string)
	return s
}

// matchToken: code, system|code, |code (no system), system| (any code).
func matchToken(node any, v, mod string) bool {
	system, code, hasSys := strings.Cut(v, "|")
	if !hasSys {
		code, system = v, ""
	}
	check := func(s, c string) bool {
		if hasSys && system != s {
			return false
		}
		return code == "" || c == code
	}
	switch x := node.(type) {
	case string:
		return mod != "text" && check("", x)
	case bool:
		return mod != "text" && check("", strconv.FormatBool(x))
	case map[string]any:
		if mod == "text" {
			if t := str(x, "text"); t != "" && strings.HasPrefix(strings.ToLower(t), strings.ToLower(v)) {
				return true
			}
			for _, cd := range flatten(x["coding"]) {
				if m, ok := cd.(map[string]any); ok && strings.HasPrefix(strings.ToLower(str(m, "display")), strings.ToLower(v)) {
					return true
				}
			}
			return strings.HasPrefix(strings.ToLower(str(x, "display")), strings.ToLower(v))
		}
		if codings, ok := x["coding"]; ok {
			for _, cd := range flatten(codings) {
				if m, ok := cd.(map[string]any); ok && check(str(m, "system"), str(m, "code")) {
					return true
				}
			}
			return false
		}
		if _, ok := x["code"]; ok {
			return check(str(x, "system"), str(x, "code"))
		}
		if _, ok := x["value"]; ok {
			// Identifier (system|value) and ContactPoint (value).
			return check(str(x, "system"), fmt.Sprint(x["value"])) || (!hasSys && fmt.Sprint(x["value"]) == code)
		}
	}
	return false
}

func matchReference(node any, v string) bool {
	m, ok := node.(map[string]any)
	if !ok {
		return false
	}
	ref := str(m, "reference")
	if ref == "" {
		return false
	}
	if i := strings.Index(ref, "/_history/"); i >= 0 {
		ref = ref[:i]
	}
	if strings.Contains(v, "/") {
		// Type/id or an absolute URL: compare the Type/id ends.
		return ref == v || strings.HasSuffix(ref, "/"+lastTwo(v)) || strings.HasSuffix(v, "/"+ref) || lastTwo(ref) == lastTwo(v)
	}
	return ref == v || strings.HasSuffix(ref, "/"+v)
}

func lastTwo(s string) string {
	parts := strings.Split(strings.TrimSuffix(s, "/"), "/")
	if len(parts) < 2 {
		return s
	}
	return parts[len(parts)-2] + "/" + parts[len(parts)-1]
}

var (
	minTime = time.Unix(-1<<40, 0)
	maxTime = time.Unix(1<<40, 0)
)

// period reads a date, dateTime, instant or Period node as [start, end).
func period(node any) (time.Time, time.Time, bool) {
	switch x := node.(type) {
	case string:
		s, e, _, err := ParseDateTime(x)
		return s, e, err == nil
	case map[string]any:
		s, e := minTime, maxTime
		_, hasStart := x["start"]
		_, hasEnd := x["end"]
		if !hasStart && !hasEnd {
			return s, e, false
		}
		if v := str(x, "start"); v != "" {
			ps, _, _, err := ParseDateTime(v)
			if err != nil {
				return s, e, false
			}
			s = ps
		}
		if v := str(x, "end"); v != "" {
			_, pe, _, err := ParseDateTime(v)
			if err != nil {
				return s, e, false
			}
			e = pe
		}
		return s, e, true
	}
	return time.Time{}, time.Time{}, false
}

// matchDate applies a prefix to the target range [s, e) and the search range [qs, qe).
func (q *Query) matchDate(node any, v string) bool {
	s, e, ok := period(node)
	if !ok {
		return false
	}
	prefix, d := splitPrefix(v)
	qs, qe, _, err := ParseDateTime(d)
	if err != nil {
		return false
	}
	switch prefix {
	case "eq":
		return !s.Before(qs) && !e.After(qe)
	case "ne":
		return s.Before(qs) || e.After(qe)
	case "gt":
		return e.After(qe)
	case "lt":
		return s.Before(qs)
	case "ge":
		return e.After(qs)
	case "le":
		return s.Before(qe)
	case "sa":
		return !s.Before(qe)
	case "eb":
		return !e.After(qs)
	case "ap":
		// Approximately: the search range widened by 10 % of its distance from now (at least a day).
		now := q.Now
		if now.IsZero() {
			now = time.Now()
		}
		gap := time.Duration(math.Abs(float64(now.Sub(qs)))) / 10
		if gap < 24*time.Hour {
			gap = 24 * time.Hour
		}
		return s.Before(qe.Add(gap)) && e.After(qs.Add(-gap))
	}
	return false
}

// stringParts lists the text of a string-searchable node (HumanName and Address parts).
func stringParts(node any) []string {
	switch x := node.(type) {
	case string:
		return []string{x}
	case map[string]any:
		var out []string
		for _, k := range []string{"text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country"} {
			for _, v := range flatten(x[k]) {
				if s, ok := v.(string); ok {
					out = append(out, s)
				}
			}
		}
		return out
	}
	return nil
}

func matchString(node any, v, mod string) bool {
	for _, s := range stringParts(node) {
		switch mod {
		case "exact":
			if s == v {
				return true
			}
		case "contains":
			if strings.Contains(strings.ToLower(s), strings.ToLower(v)) {
				return true
			}
		default:
			if strings.HasPrefix(strings.ToLower(s), strings.ToLower(v)) {
				return true
			}
		}
	}
	return false
}

func number(node any) (float64, bool) {
	switch x := node.(type) {
	case json.Number:
		f, err := x.Float64()
		return f, err == nil
	case float64:
		return x, true
	}
	return 0, false
}

// matchNumber: eq uses the precision of the value written (5.4 means [5.35, 5.45)).
func matchNumber(f float64, v string) bool {
	prefix, n := splitPrefix(v)
	want, err := strconv.ParseFloat(n, 64)
	if err != nil {
		return false
	}
	half := 0.5
	if i := strings.IndexByte(n, '.'); i >= 0 {
		half = 0.5 * math.Pow10(-(len(n) - i - 1))
	}
	switch prefix {
	case "eq", "ap":
		if prefix == "ap" {
			half = math.Max(half, math.Abs(want)*0.1)
		}
		return f >= want-half && f < want+half
	case "ne":
		return f < want-half || f >= want+half
	case "gt", "sa":
		return f > want
	case "lt", "eb":
		return f < want
	case "ge":
		return f >= want
	case "le":
		return f <= want
	}
	return false
}

func matchQuantity(node any, v string) bool {
	m, ok := node.(map[string]any)
	if !ok {
		return false
	}
	prefix, rest := splitPrefix(v)
	parts := strings.SplitN(rest, "|", 3)
	f, ok := number(m["value"])
	if !ok || !matchNumber(f, prefix+parts[0]) {
		return false
	}
	if len(parts) == 3 {
		system, code := parts[1], parts[2]
		if system != "" && str(m, "system") != system {
			return false
		}
		if code != "" && str(m, "code") != code && str(m, "unit") != code {
			return false
		}
	}
	return true
}

// ParseTypeFilter reads one _typeFilter value, "Type?query".
func ParseTypeFilter(v string) (*Query, error) {
	typ, query, ok := strings.Cut(v, "?")
	if !ok || typ == "" {
		return nil, kiln.Invalid("_typeFilter", "_typeFilter %q is not Type?query", v)
	}
	params, err := url.ParseQuery(query)
	if err != nil {
		return nil, kiln.Invalid("_typeFilter", "_typeFilter %q: %v", v, err)
	}
	q, err := ParseQuery(typ, params, false)
	if err != nil {
		if e, ok := err.(*kiln.Error); ok {
			e.Message = "_typeFilter " + v + ": " + e.Message
			e.Expression = []string{"_typeFilter"}
		}
		return nil, err
	}
	return q, nil
}
