// Package view compiles SQL on FHIR v2 ViewDefinitions and evaluates them
// over FHIR resources decoded from JSON, giving flat rows of typed columns.
//
// A ViewDefinition is compiled once (Compile); every structural problem is
// refused then, as a *kiln.Error whose Expression names the bad element
// (ViewDefinition.select[0].column[1].path). Problems only a resource can
// show — a non-collection column with several values, a where that is not
// boolean — are errors of Rows, located the same way.
package view

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhirpath"
)

// Column is one output column, in view order.
type Column struct {
	Name string
	// Type is the FHIR type the view declares ("" when it declares none).
	Type       string
	Collection bool
	Path       string
	at         string // the element, for errors
}

// View is a compiled ViewDefinition.
type View struct {
	Resource string
	Name     string
	Columns  []Column
	where    []compiled
	consts   map[string][]fhirpath.Item
	top      *selection
}

type compiled struct {
	expr *fhirpath.Expr
	at   string // element path, for errors
}

type column struct {
	compiled
	idx        int
	collection bool
}

type selection struct {
	at      string
	cols    []column
	forEach *compiled
	orNull  bool
	repeat  []compiled
	selects []*selection
	unions  []*selection
	width   int // number of columns this selection produces
}

var columnName = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]*$`)

// builtin constants every expression may use without the view defining them.
var builtin = map[string]bool{"rowIndex": true, "resource": true, "rootResource": true, "context": true, "ucum": true, "sct": true, "loinc": true}

// Parse compiles a ViewDefinition given as JSON.
func Parse(body []byte) (*View, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, kiln.Invalid("ViewDefinition", "the ViewDefinition is not a JSON object: %v", err)
	}
	return Compile(m)
}

// Compile compiles a ViewDefinition decoded from JSON (numbers as json.Number).
func Compile(m map[string]any) (*View, error) {
	const root = "ViewDefinition"
	if rt, ok := m["resourceType"]; ok && rt != "ViewDefinition" {
		return nil, kiln.Invalid(root+".resourceType", "resourceType must be ViewDefinition, got %v", rt)
	}
	v := &View{consts: map[string][]fhirpath.Item{}}
	var ok bool
	if v.Resource, ok = m["resource"].(string); !ok || v.Resource == "" {
		return nil, kiln.Invalid(root+".resource", "resource (the FHIR resource type the view reads) is required")
	}
	if n, ok := m["name"]; ok {
		if v.Name, ok = n.(string); !ok {
			return nil, kiln.Invalid(root+".name", "name must be a string")
		}
	}
	consts, err := array(m, "constant", root)
	if err != nil {
		return nil, err
	}
	for i, c := range consts {
		at := fmt.Sprintf("%s.constant[%d]", root, i)
		cm, ok := c.(map[string]any)
		if !ok {
			return nil, kiln.Invalid(at, "a constant must be an object")
		}
		name, _ := cm["name"].(string)
		if !columnName.MatchString(name) {
			return nil, kiln.Invalid(at+".name", "constant name %q must be letters, digits and _ starting with a letter", name)
		}
		if _, dup := v.consts[name]; dup || builtin[name] {
			return nil, kiln.Invalid(at+".name", "constant %q is defined twice or is a reserved name", name)
		}
		var val []fhirpath.Item
		for k, x := range cm {
			typ, isValue := strings.CutPrefix(k, "value")
			if !isValue || typ == "" {
				continue
			}
			if val != nil {
				return nil, kiln.Invalid(at, "constant %q has more than one value[x]", name)
			}
			if _, isObj := x.(map[string]any); isObj {
				return nil, kiln.Invalid(at+"."+k, "constant %q: only primitive values are supported", name)
			}
			val = []fhirpath.Item{{V: x, T: strings.ToLower(typ[:1]) + typ[1:]}}
		}
		if val == nil {
			return nil, kiln.Invalid(at, "constant %q has no value[x]", name)
		}
		v.consts[name] = val
	}
	wheres, err := array(m, "where", root)
	if err != nil {
		return nil, err
	}
	for i, w := range wheres {
		at := fmt.Sprintf("%s.where[%d]", root, i)
		wm, ok := w.(map[string]any)
		if !ok {
			return nil, kiln.Invalid(at, "a where must be an object with a path")
		}
		c, err := v.expr(wm, "path", at, true)
		if err != nil {
			return nil, err
		}
		v.where = append(v.where, *c)
	}
	v.top = &selection{at: root}
	sels, err := array(m, "select", root)
	if err != nil {
		return nil, err
	}
	if len(sels) == 0 {
		return nil, kiln.Invalid(root+".select", "a view needs at least one select")
	}
	for i, s := range sels {
		child, err := v.selection(s, fmt.Sprintf("%s.select[%d]", root, i))
		if err != nil {
			return nil, err
		}
		v.top.selects = append(v.top.selects, child)
		v.top.width += child.width
	}
	seen := map[string]bool{}
	for _, c := range v.Columns {
		if seen[c.Name] {
			return nil, kiln.Invalid(c.at, "column name %q is used twice", c.Name)
		}
		seen[c.Name] = true
	}
	return v, nil
}

// array reads m[key] as an optional JSON array.
func array(m map[string]any, key, at string) ([]any, error) {
	x, ok := m[key]
	if !ok || x == nil {
		return nil, nil
	}
	a, ok := x.([]any)
	if !ok {
		return nil, kiln.Invalid(at+"."+key, "%s must be an array", key)
	}
	return a, nil
}

// expr compiles m[key] as FHIRPath, checking the constants it uses.
func (v *View) expr(m map[string]any, key, at string, required bool) (*compiled, error) {
	at += "." + key
	x, ok := m[key]
	if !ok {
		if required {
			return nil, kiln.Invalid(at, "%s is required", key)
		}
		return nil, nil
	}
	s, ok := x.(string)
	if !ok || s == "" {
		return nil, kiln.Invalid(at, "%s must be a FHIRPath expression (a non-empty string)", key)
	}
	e, err := fhirpath.Parse(s)
	if err != nil {
		return nil, kiln.Invalid(at, "%s is not valid FHIRPath: %v", key, err)
	}
	for _, c := range e.Constants() {
		if _, ok := v.consts[c]; !ok && !builtin[c] {
			return nil, kiln.Invalid(at, "%%%s is not a constant of this view", c)
		}
	}
	return &compiled{expr: e, at: at}, nil
}

var selectKeys = map[string]bool{"column": true, "select": true, "forEach": true, "forEachOrNull": true, "repeat": true, "unionAll": true}

func (v *View) selection(x any, at string) (*selection, error) {
	m, ok := x.(map[string]any)
	if !ok {
		return nil, kiln.Invalid(at, "a select must be an object")
	}
	for k := range m {
		if !selectKeys[k] && k != "description" && k != "extension" && k != "id" {
			return nil, kiln.Invalid(at+"."+k, "%s is not an element of a select", k)
		}
	}
	s := &selection{at: at}
	n := 0
	for _, k := range []string{"forEach", "forEachOrNull", "repeat"} {
		if _, ok := m[k]; ok {
			n++
		}
	}
	if n > 1 {
		return nil, kiln.Invalid(at, "a select takes at most one of forEach, forEachOrNull and repeat")
	}
	var err error
	if s.forEach, err = v.expr(m, "forEach", at, false); err != nil {
		return nil, err
	}
	if s.forEach == nil {
		if s.forEach, err = v.expr(m, "forEachOrNull", at, false); err != nil {
			return nil, err
		}
		s.orNull = s.forEach != nil
	}
	reps, err := array(m, "repeat", at)
	if err != nil {
		return nil, err
	}
	if _, has := m["repeat"]; has && len(reps) == 0 {
		return nil, kiln.Invalid(at+".repeat", "repeat needs at least one path")
	}
	for i := range reps {
		c, err := v.expr(map[string]any{"repeat": reps[i]}, "repeat", at, true)
		if err != nil {
			return nil, err
		}
		c.at = fmt.Sprintf("%s.repeat[%d]", at, i)
		s.repeat = append(s.repeat, *c)
	}
	cols, err := array(m, "column", at)
	if err != nil {
		return nil, err
	}
	for i, c := range cols {
		cat := fmt.Sprintf("%s.column[%d]", at, i)
		cm, ok := c.(map[string]any)
		if !ok {
			return nil, kiln.Invalid(cat, "a column must be an object")
		}
		name, _ := cm["name"].(string)
		if !columnName.MatchString(name) {
			return nil, kiln.Invalid(cat+".name", "column name %q must be letters, digits and _ starting with a letter", name)
		}
		e, err := v.expr(cm, "path", cat, true)
		if err != nil {
			return nil, err
		}
		col := column{compiled: *e, idx: len(v.Columns)}
		if x, ok := cm["collection"]; ok {
			if col.collection, ok = x.(bool); !ok {
				return nil, kiln.Invalid(cat+".collection", "collection must be true or false")
			}
		}
		typ := ""
		if x, ok := cm["type"]; ok {
			if typ, ok = x.(string); !ok {
				return nil, kiln.Invalid(cat+".type", "type must be a FHIR type name")
			}
		}
		v.Columns = append(v.Columns, Column{Name: name, Type: typ, Collection: col.collection, Path: e.expr.String(), at: cat})
		s.cols = append(s.cols, col)
		s.width++
	}
	subs, err := array(m, "select", at)
	if err != nil {
		return nil, err
	}
	for i, x := range subs {
		child, err := v.selection(x, fmt.Sprintf("%s.select[%d]", at, i))
		if err != nil {
			return nil, err
		}
		s.selects = append(s.selects, child)
		s.width += child.width
	}
	unions, err := array(m, "unionAll", at)
	if err != nil {
		return nil, err
	}
	var first []string
	for i, x := range unions {
		uat := fmt.Sprintf("%s.unionAll[%d]", at, i)
		start := len(v.Columns)
		child, err := v.selection(x, uat)
		if err != nil {
			return nil, err
		}
		var names []string
		for _, c := range v.Columns[start:] {
			names = append(names, c.Name)
		}
		if i == 0 {
			first = names
			s.width += child.width
		} else {
			if strings.Join(names, ",") != strings.Join(first, ",") {
				return nil, kiln.Invalid(uat, "every unionAll branch must have the columns %v in that order, this one has %v", first, names)
			}
			// A later branch fills the first branch's columns, position for position.
			to := map[int]int{}
			for k, old := range columnsOf(child) {
				to[old] = columnsOf(s.unions[0])[k]
			}
			renumber(child, to)
			v.Columns = v.Columns[:start]
		}
		s.unions = append(s.unions, child)
	}
	return s, nil
}

// renumber moves every column of a selection tree to the index to gives.
func renumber(s *selection, to map[int]int) {
	for j := range s.cols {
		s.cols[j].idx = to[s.cols[j].idx]
	}
	for _, c := range s.selects {
		renumber(c, to)
	}
	for _, c := range s.unions {
		renumber(c, to)
	}
}

// columnsOf lists the view column indexes a selection fills, in its order.
func columnsOf(s *selection) []int {
	var out []int
	for _, c := range s.cols {
		out = append(out, c.idx)
	}
	for _, c := range s.selects {
		out = append(out, columnsOf(c)...)
	}
	if len(s.unions) > 0 {
		out = append(out, columnsOf(s.unions[0])...)
	}
	return out
}

// Rows evaluates the view on one resource. Each row has one value per
// column: nil, string, bool, json.Number, a map (a complex value) or, for
// a collection column, []any.
func (v *View) Rows(res map[string]any) ([][]any, error) {
	if res["resourceType"] != v.Resource {
		return nil, nil
	}
	focus := fhirpath.Of(res)
	env := &fhirpath.Env{Constants: v.consts}
	for _, w := range v.where {
		out, err := w.expr.Eval(focus, env)
		if err != nil {
			return nil, kiln.Invalid(w.at, "%v", err)
		}
		if len(out) > 1 {
			return nil, kiln.Invalid(w.at, "where gave %d values; it must give one boolean", len(out))
		}
		if len(out) == 0 {
			return nil, nil
		}
		b, ok := out[0].V.(bool)
		if !ok {
			return nil, kiln.Invalid(w.at, "where gave %v, not a boolean", out[0].V)
		}
		if !b {
			return nil, nil
		}
	}
	parts, err := v.eval(v.top, focus[0], 0)
	if err != nil {
		return nil, err
	}
	rows := make([][]any, len(parts))
	for i, p := range parts {
		row := make([]any, len(v.Columns))
		for _, c := range p {
			row[c.idx] = c.val
		}
		rows[i] = row
	}
	return rows, nil
}

// cell is one value placed in a view column.
type cell struct {
	idx int
	val any
}

// eval gives the rows of s on focus. %rowIndex is the index of the item in
// s's forEach, forEachOrNull or repeat, else the enclosing one's (rowIndex).
func (v *View) eval(s *selection, focus fhirpath.Item, rowIndex int) ([][]cell, error) {
	foci := []fhirpath.Item{focus}
	iterates := true
	switch {
	case s.forEach != nil:
		out, err := s.forEach.expr.Eval(foci, &fhirpath.Env{Constants: v.consts})
		if err != nil {
			return nil, kiln.Invalid(s.forEach.at, "%v", err)
		}
		if len(out) == 0 && s.orNull {
			var row []cell
			for _, i := range columnsOf(s) {
				row = append(row, cell{idx: i})
			}
			// The null row still has %rowIndex 0.
			for _, c := range s.cols {
				if c.expr.String() == "%rowIndex" {
					row = append(row, cell{idx: c.idx, val: json.Number("0")})
				}
			}
			return [][]cell{row}, nil
		}
		foci = out
	case len(s.repeat) > 0:
		var err error
		if foci, err = v.repeat(s, focus, nil, 0); err != nil {
			return nil, err
		}
	default:
		iterates = false
	}
	var rows [][]cell
	for i, f := range foci {
		if !iterates {
			i = rowIndex
		}
		env := &fhirpath.Env{Constants: v.consts, Local: map[string][]fhirpath.Item{
			"rowIndex": {{V: json.Number(strconv.Itoa(i)), T: "integer"}},
		}}
		in := []fhirpath.Item{f}
		base := make([]cell, 0, s.width)
		for _, c := range s.cols {
			out, err := c.expr.Eval(in, env)
			if err != nil {
				return nil, kiln.Invalid(c.at, "%v", err)
			}
			val, err := columnValue(c, out)
			if err != nil {
				return nil, err
			}
			base = append(base, cell{idx: c.idx, val: val})
		}
		acc := [][]cell{base}
		for _, sub := range s.selects {
			r, err := v.eval(sub, f, i)
			if err != nil {
				return nil, err
			}
			acc = product(acc, r)
		}
		if len(s.unions) > 0 {
			var all [][]cell
			for _, u := range s.unions {
				r, err := v.eval(u, f, i)
				if err != nil {
					return nil, err
				}
				all = append(all, r...)
			}
			acc = product(acc, all)
		}
		rows = append(rows, acc...)
	}
	return rows, nil
}

// maxRepeatDepth bounds the nesting a view's repeat follows.
const maxRepeatDepth = 1000

// repeat collects, depth first, every item reached from focus by applying
// the repeat paths again and again (focus itself excluded).
func (v *View) repeat(s *selection, focus fhirpath.Item, out []fhirpath.Item, depth int) ([]fhirpath.Item, error) {
	// A path that does not descend ($this, %resource) would recurse for ever.
	if depth > maxRepeatDepth {
		return nil, kiln.Invalid(s.repeat[0].at, "repeat went more than %d levels deep; its paths must lead to child elements", maxRepeatDepth)
	}
	for _, p := range s.repeat {
		kids, err := p.expr.Eval([]fhirpath.Item{focus}, &fhirpath.Env{Constants: v.consts})
		if err != nil {
			return nil, kiln.Invalid(p.at, "%v", err)
		}
		for _, k := range kids {
			out = append(out, k)
			if out, err = v.repeat(s, k, out, depth+1); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

func product(a, b [][]cell) [][]cell {
	out := make([][]cell, 0, len(a)*len(b))
	for _, x := range a {
		for _, y := range b {
			row := make([]cell, 0, len(x)+len(y))
			out = append(out, append(append(row, x...), y...))
		}
	}
	return out
}

func columnValue(c column, out []fhirpath.Item) (any, error) {
	if c.collection {
		vals := make([]any, len(out))
		for i, it := range out {
			vals[i] = it.V
		}
		return vals, nil
	}
	switch len(out) {
	case 0:
		return nil, nil
	case 1:
		return out[0].V, nil
	}
	return nil, kiln.Invalid(c.at, "the path gave %d values; a column without collection: true takes at most one", len(out))
}
