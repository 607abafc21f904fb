package fhirpath

import (
	"encoding/json"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"
)

// Item is one value of a collection: a JSON value of a decoded resource (a
// map[string]any, string, bool or json.Number) and, when known, its FHIR type
// name (from a choice element's suffix, a literal or a constant).
type Item struct {
	V any
	T string
}

// Env is what an evaluation may refer to besides its input.
type Env struct {
	// Constants are the values of %name; %resource, %rootResource and
	// %context default to the input of Eval.
	Constants map[string][]Item
	// Local shadows Constants (a view's %rowIndex).
	Local map[string][]Item
}

type ctx struct {
	env   *Env
	root  []Item // %resource / %context
	this  []Item // the focus that arguments of non-iterating functions see
	index int    // $index inside an iterating function
}

// Eval evaluates e with focus as its input.
func (e *Expr) Eval(focus []Item, env *Env) (out []Item, err error) {
	if env == nil {
		env = &Env{}
	}
	c := &ctx{env: env, root: focus, this: focus}
	return c.eval(e.root, focus)
}

// Of wraps a decoded JSON value as the input of Eval.
func Of(v any) []Item {
	return appendValue(nil, v, "")
}

func evalErr(n *node, format string, a ...any) error {
	return &Error{Pos: n.pos, Msg: fmt.Sprintf(format, a...)}
}

func (c *ctx) eval(n *node, focus []Item) ([]Item, error) {
	switch n.kind {
	case nLiteral:
		return []Item{n.val}, nil
	case nEmpty:
		return nil, nil
	case nConst:
		switch n.name {
		case "resource", "rootResource", "context":
			if v, ok := c.env.Constants[n.name]; ok {
				return v, nil
			}
			return c.root, nil
		case "ucum":
			return []Item{{V: "http://unitsofmeasure.org", T: "string"}}, nil
		case "sct":
			return []Item{{V: "http://snomed.info/sct", T: "string"}}, nil
		case "loinc":
			return []Item{{V: "http://loinc.org", T: "string"}}, nil
		}
		v, ok := c.env.Local[n.name]
		if !ok {
			v, ok = c.env.Constants[n.name]
		}
		if !ok {
			return nil, evalErr(n, "constant %%%s is not defined", n.name)
		}
		return v, nil
	case nVar:
		switch n.name {
		case "$this":
			return c.this, nil
		case "$index":
			return []Item{{V: json.Number(strconv.Itoa(c.index)), T: "integer"}}, nil
		}
		return nil, evalErr(n, "%s is not supported", n.name)
	case nMember:
		var out []Item
		for _, it := range focus {
			out = member(out, it, n.name)
		}
		return out, nil
	case nCall:
		return funcs[n.name].fn(c, n, focus)
	case nDot:
		left, err := c.eval(n.left, focus)
		if err != nil {
			return nil, err
		}
		return c.eval(n.right, left)
	case nIndex:
		left, err := c.eval(n.left, focus)
		if err != nil {
			return nil, err
		}
		idx, err := c.eval(n.args[0], c.this)
		if err != nil {
			return nil, err
		}
		i, ok, err := singleInt(n, idx)
		if err != nil || !ok {
			return nil, err
		}
		if i < 0 || i >= int64(len(left)) {
			return nil, nil
		}
		return left[i : i+1], nil
	case nUnary:
		v, err := c.eval(n.left, focus)
		if err != nil || n.name == "+" || len(v) == 0 {
			return v, err
		}
		return arith(n, "*", []Item{{V: json.Number("-1"), T: "integer"}}, v)
	case nTypeOp:
		v, err := c.eval(n.left, focus)
		if err != nil {
			return nil, err
		}
		typ := n.val.V.(string)
		if n.name == "as" {
			return ofType(v, typ), nil
		}
		if len(v) == 0 {
			return nil, nil
		}
		if len(v) > 1 {
			return nil, evalErr(n, "'is' needs a single item, got %d", len(v))
		}
		return boolean(len(ofType(v, typ)) == 1), nil
	case nBinary:
		return c.binary(n, focus)
	}
	return nil, evalErr(n, "unknown expression")
}

func boolean(b bool) []Item { return []Item{{V: b, T: "boolean"}} }

// appendValue adds a JSON value (arrays flattened, nulls dropped) to out.
func appendValue(out []Item, v any, typ string) []Item {
	switch x := v.(type) {
	case nil:
		return out
	case []any:
		for _, e := range x {
			out = appendValue(out, e, typ)
		}
		return out
	case map[string]any:
		if rt, ok := x["resourceType"].(string); ok && typ == "" {
			typ = rt
		}
	}
	return append(out, Item{V: v, T: typ})
}

// member navigates one child element of it.
func member(out []Item, it Item, name string) []Item {
	m, ok := it.V.(map[string]any)
	if !ok {
		return out
	}
	if v, ok := m[name]; ok {
		return appendValue(out, v, "")
	}
	// A type name at the start of a path (Patient.name) selects the resource itself.
	if isUpper(name) && m["resourceType"] == name {
		return append(out, it)
	}
	// A choice element: value → valueQuantity, valueString, …; the suffix is its type.
	for k, v := range m {
		if len(k) <= len(name) || !strings.HasPrefix(k, name) {
			continue
		}
		if t, ok := choiceTypes[k[len(name):]]; ok {
			out = appendValue(out, v, t)
		}
	}
	return out
}

// choiceTypes maps the suffix of a choice element's JSON key to the FHIR type.
var choiceTypes = func() map[string]string {
	m := map[string]string{}
	for _, t := range []string{"base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id", "instant",
		"integer", "integer64", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt", "uri", "url", "uuid"} {
		m[strings.ToUpper(t[:1])+t[1:]] = t
	}
	for _, t := range []string{"Address", "Age", "Annotation", "Attachment", "CodeableConcept", "CodeableReference", "Coding",
		"ContactDetail", "ContactPoint", "Contributor", "Count", "DataRequirement", "Distance", "Dosage", "Duration", "Expression",
		"HumanName", "Identifier", "Meta", "Money", "ParameterDefinition", "Period", "Quantity", "Range", "Ratio", "RatioRange",
		"Reference", "RelatedArtifact", "SampledData", "Signature", "Timing", "TriggerDefinition", "UsageContext", "Availability",
		"ExtendedContactDetail"} {
		m[t] = t
	}
	return m
}()

// typeOf returns the FHIR type of an item: the known one, else inferred from
// the JSON value.
func typeOf(it Item) string {
	if it.T != "" {
		return it.T
	}
	switch x := it.V.(type) {
	case string:
		return "string"
	case bool:
		return "boolean"
	case json.Number:
		if strings.ContainsAny(string(x), ".eE") {
			return "decimal"
		}
		return "integer"
	case map[string]any:
		if rt, ok := x["resourceType"].(string); ok {
			return rt
		}
	}
	return ""
}

func ofType(in []Item, typ string) []Item {
	typ = strings.TrimPrefix(strings.TrimPrefix(typ, "FHIR."), "System.")
	var out []Item
	for _, it := range in {
		t := typeOf(it)
		// System types (String, Boolean, …) name FHIR's primitives too.
		if t == typ || !isUpper(t) && strings.EqualFold(t, typ) {
			out = append(out, it)
		}
	}
	return out
}

// number reads a numeric item.
func number(it Item) (i int64, f float64, isInt, ok bool) {
	var s string
	switch x := it.V.(type) {
	case json.Number:
		s = string(x)
	case int64:
		return x, float64(x), true, true
	case float64:
		return 0, x, false, true
	default:
		return 0, 0, false, false
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return n, float64(n), true, true
	}
	f, err := strconv.ParseFloat(s, 64)
	return 0, f, false, err == nil
}

func numberLit(s string) json.Number { return json.Number(s) }

func intItem(n int64) Item { return Item{V: json.Number(strconv.FormatInt(n, 10)), T: "integer"} }

func decItem(f float64) Item {
	return Item{V: json.Number(strconv.FormatFloat(f, 'f', -1, 64)), T: "decimal"}
}

func singleInt(n *node, v []Item) (int64, bool, error) {
	if len(v) == 0 {
		return 0, false, nil
	}
	i, _, isInt, ok := number(v[0])
	if len(v) > 1 || !ok || !isInt {
		return 0, false, evalErr(n, "expected a single integer")
	}
	return i, true, nil
}

// boolOf is the singleton evaluation of a collection as a boolean: empty is
// unknown (ok false); a single non-boolean item counts as true.
func boolOf(n *node, v []Item) (b, ok bool, err error) {
	if len(v) == 0 {
		return false, false, nil
	}
	if len(v) > 1 {
		return false, false, evalErr(n, "expected a single boolean, got %d items", len(v))
	}
	if b, isBool := v[0].V.(bool); isBool {
		return b, true, nil
	}
	return true, true, nil
}

func (c *ctx) binary(n *node, focus []Item) ([]Item, error) {
	left, err := c.eval(n.left, focus)
	if err != nil {
		return nil, err
	}
	switch n.name {
	case "and", "or", "xor", "implies":
		return c.logic(n, left, focus)
	}
	right, err := c.eval(n.right, focus)
	if err != nil {
		return nil, err
	}
	switch n.name {
	case "|":
		return union(left, right), nil
	case "=", "!=":
		if len(left) == 0 || len(right) == 0 {
			return nil, nil
		}
		eq, ok := equalColl(left, right)
		if !ok {
			return nil, nil
		}
		return boolean(eq == (n.name == "=")), nil
	case "~", "!~":
		eq := len(left) == len(right)
		for i := 0; eq && i < len(left); i++ {
			eq = equivalent(left[i], right[i])
		}
		return boolean(eq == (n.name == "~")), nil
	case "<", ">", "<=", ">=":
		if len(left) == 0 || len(right) == 0 {
			return nil, nil
		}
		if len(left) > 1 || len(right) > 1 {
			return nil, evalErr(n, "%s compares single items", n.name)
		}
		cmp, ok := compare(left[0], right[0])
		if !ok {
			return nil, nil
		}
		switch n.name {
		case "<":
			return boolean(cmp < 0), nil
		case ">":
			return boolean(cmp > 0), nil
		case "<=":
			return boolean(cmp <= 0), nil
		}
		return boolean(cmp >= 0), nil
	case "in", "contains":
		elem, coll := left, right
		if n.name == "contains" {
			elem, coll = right, left
		}
		if len(elem) == 0 {
			return nil, nil
		}
		if len(elem) > 1 {
			return nil, evalErr(n, "%s needs a single item", n.name)
		}
		for _, it := range coll {
			if eq, ok := equal(elem[0], it); ok && eq {
				return boolean(true), nil
			}
		}
		return boolean(false), nil
	case "&":
		return []Item{{V: str(left) + str(right), T: "string"}}, nil
	}
	if len(left) == 0 || len(right) == 0 {
		return nil, nil
	}
	if n.name == "+" {
		ls, lok := left[0].V.(string)
		rs, rok := right[0].V.(string)
		if lok && rok && len(left) == 1 && len(right) == 1 {
			return []Item{{V: ls + rs, T: "string"}}, nil
		}
	}
	return arith(n, n.name, left, right)
}

func str(v []Item) string {
	if len(v) == 0 {
		return ""
	}
	s, _ := toString(v[0])
	return s
}

func arith(n *node, op string, left, right []Item) ([]Item, error) {
	if len(left) > 1 || len(right) > 1 {
		return nil, evalErr(n, "%s takes single items", op)
	}
	li, lf, lint, lok := number(left[0])
	ri, rf, rint, rok := number(right[0])
	if !lok || !rok {
		return nil, evalErr(n, "%s takes numbers", op)
	}
	ints := lint && rint
	switch op {
	case "+":
		if ints {
			return []Item{intItem(li + ri)}, nil
		}
		return []Item{decItem(lf + rf)}, nil
	case "-":
		if ints {
			return []Item{intItem(li - ri)}, nil
		}
		return []Item{decItem(lf - rf)}, nil
	case "*":
		if ints {
			return []Item{intItem(li * ri)}, nil
		}
		return []Item{decItem(lf * rf)}, nil
	case "/":
		if rf == 0 {
			return nil, nil
		}
		return []Item{decItem(lf / rf)}, nil
	case "div":
		if rf == 0 {
			return nil, nil
		}
		if ints {
			return []Item{intItem(li / ri)}, nil
		}
		return []Item{intItem(int64(math.Trunc(lf / rf)))}, nil
	case "mod":
		if rf == 0 {
			return nil, nil
		}
		if ints {
			return []Item{intItem(li % ri)}, nil
		}
		return []Item{decItem(math.Mod(lf, rf))}, nil
	}
	return nil, evalErr(n, "unknown operator %s", op)
}

func (c *ctx) logic(n *node, left, focus []Item) ([]Item, error) {
	l, lok, err := boolOf(n, left)
	if err != nil {
		return nil, err
	}
	// Short cuts that do not need the right side.
	switch {
	case n.name == "and" && lok && !l, n.name == "or" && lok && l:
		return boolean(l), nil
	case n.name == "implies" && lok && !l:
		return boolean(true), nil
	}
	right, err := c.eval(n.right, focus)
	if err != nil {
		return nil, err
	}
	r, rok, err := boolOf(n, right)
	if err != nil {
		return nil, err
	}
	switch n.name {
	case "and":
		if rok && !r {
			return boolean(false), nil
		}
		if lok && rok {
			return boolean(true), nil
		}
	case "or":
		if rok && r {
			return boolean(true), nil
		}
		if lok && rok {
			return boolean(false), nil
		}
	case "xor":
		if lok && rok {
			return boolean(l != r), nil
		}
	case "implies":
		if rok && r {
			return boolean(true), nil
		}
		if lok && rok {
			return boolean(false), nil
		}
	}
	return nil, nil
}

func union(a, b []Item) []Item {
	var out []Item
	for _, it := range append(append([]Item(nil), a...), b...) {
		dup := false
		for _, o := range out {
			if eq, ok := equal(o, it); ok && eq {
				dup = true
				break
			}
		}
		if !dup {
			out = append(out, it)
		}
	}
	return out
}

func equalColl(a, b []Item) (bool, bool) {
	if len(a) != len(b) {
		return false, true
	}
	for i := range a {
		eq, ok := equal(a[i], b[i])
		if !ok || !eq {
			return eq, ok
		}
	}
	return true, true
}

var temporal = map[string]bool{"date": true, "dateTime": true, "instant": true, "time": true}

// equal is FHIRPath '=' on two items; ok false when the result is empty
// (dates of different precision).
func equal(a, b Item) (eq, ok bool) {
	if _, _, _, an := number(a); an {
		if _, _, _, bn := number(b); bn {
			c, _ := compare(a, b)
			return c == 0, true
		}
		return false, true
	}
	if as, isStr := a.V.(string); isStr {
		bs, isStr := b.V.(string)
		if !isStr {
			return false, true
		}
		if temporal[a.T] || temporal[b.T] {
			if datePrecision(as) != datePrecision(bs) {
				return false, false
			}
			return normalizeDate(as) == normalizeDate(bs), true
		}
		return as == bs, true
	}
	return reflect.DeepEqual(a.V, b.V), true
}

// datePrecision counts the components of a date, dateTime or time text.
func datePrecision(s string) int {
	return len(strings.FieldsFunc(strings.SplitN(strings.SplitN(s, "+", 2)[0], "Z", 2)[0], func(r rune) bool {
		return r == '-' || r == 'T' || r == ':' || r == '.'
	}))
}

func normalizeDate(s string) string { return strings.TrimSuffix(s, "Z") }

func equivalent(a, b Item) bool {
	as, aok := a.V.(string)
	bs, bok := b.V.(string)
	if aok && bok {
		return strings.EqualFold(strings.Join(strings.Fields(as), " "), strings.Join(strings.Fields(bs), " "))
	}
	eq, ok := equal(a, b)
	return ok && eq
}

func compare(a, b Item) (int, bool) {
	ai, af, aint, aok := number(a)
	bi, bf, bint, bok := number(b)
	if aok && bok {
		if aint && bint {
			return cmpOrdered(ai, bi), true
		}
		return cmpOrdered(af, bf), true
	}
	as, aok := a.V.(string)
	bs, bok := b.V.(string)
	if aok && bok {
		if (temporal[a.T] || temporal[b.T]) && datePrecision(as) != datePrecision(bs) {
			return 0, false
		}
		return strings.Compare(as, bs), true
	}
	return 0, false
}

func cmpOrdered[T int64 | float64](a, b T) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func toString(it Item) (string, bool) {
	switch x := it.V.(type) {
	case string:
		return x, true
	case bool:
		return strconv.FormatBool(x), true
	case json.Number:
		return string(x), true
	}
	return "", false
}
