// Package fhirpath parses and evaluates the subset of FHIRPath (N1) that SQL on
// FHIR v2 ViewDefinitions require, over FHIR resources decoded from JSON into
// map[string]any (numbers as json.Number). It knows FHIR's JSON shape rather
// than the R4 StructureDefinitions: a choice element (value[x]) is found by
// its type-suffixed key, and that suffix is the item's type for ofType/is/as.
//
// Supported: path navigation, indexers, literals (string, integer, decimal,
// boolean, @date/@dateTime/@time, {}), %constants, $this, $index, the
// operators . [] unary-/+ * / div mod + - & is as | < > <= >= = != ~ !~ in
// contains and or xor implies, and the functions listed in funcs (see
// Functions). Not supported: quantity literals and unit arithmetic, date
// arithmetic, timezone-aware date comparison (dates compare as text of equal
// precision), resolve(), aggregate(), type reflection.
package fhirpath

import (
	"fmt"
	"strings"
	"unicode"
)

type tokKind int

const (
	tEOF tokKind = iota
	tIdent
	tString
	tNumber
	tDate // @2020-01-01, @2020-01-01T10:00, @T12:00
	tConst
	tVar // $this, $index, $total
	tOp
)

type token struct {
	kind tokKind
	text string
	pos  int
}

// Error is a syntax or evaluation error; Pos is the byte offset in the
// expression when known (-1 otherwise).
type Error struct {
	Expr string
	Pos  int
	Msg  string
}

func (e *Error) Error() string {
	if e.Pos >= 0 {
		return fmt.Sprintf("%s (at offset %d of %q)", e.Msg, e.Pos, e.Expr)
	}
	return fmt.Sprintf("%s (in %q)", e.Msg, e.Expr)
}

func lex(src string) ([]token, error) {
	var out []token
	i := 0
	bad := func(msg string) error { return &Error{Expr: src, Pos: i, Msg: msg} }
	for i < len(src) {
		c := src[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '/' && i+1 < len(src) && src[i+1] == '/':
			for i < len(src) && src[i] != '\n' {
				i++
			}
		case c == '/' && i+1 < len(src) && src[i+1] == '*':
			end := strings.Index(src[i+2:], "*/")
			if end < 0 {
				return nil, bad("unterminated comment")
			}
			i += end + 4
		case c == '\'' || c == '`':
			s, n, err := unquote(src[i:], c)
			if err != nil {
				return nil, bad(err.Error())
			}
			k := tString
			if c == '`' {
				k = tIdent
			}
			out = append(out, token{k, s, i})
			i += n
		case c == '%':
			start := i
			i++
			if i < len(src) && (src[i] == '\'' || src[i] == '`') {
				s, n, err := unquote(src[i:], src[i])
				if err != nil {
					return nil, bad(err.Error())
				}
				out = append(out, token{tConst, s, start})
				i += n
				continue
			}
			j := i
			for j < len(src) && isIdentByte(src[j]) {
				j++
			}
			if j == i {
				return nil, bad("% must be followed by a constant name")
			}
			out = append(out, token{tConst, src[i:j], start})
			i = j
		case c == '$':
			j := i + 1
			for j < len(src) && isIdentByte(src[j]) {
				j++
			}
			out = append(out, token{tVar, src[i:j], i})
			i = j
		case c == '@':
			j := i + 1
			for j < len(src) && (isIdentByte(src[j]) || strings.IndexByte("-:+Z", src[j]) >= 0 ||
				src[j] == '.' && j+1 < len(src) && src[j+1] >= '0' && src[j+1] <= '9') {
				j++
			}
			if j == i+1 {
				return nil, bad("@ must be followed by a date, dateTime or time")
			}
			out = append(out, token{tDate, src[i+1 : j], i})
			i = j
		case c >= '0' && c <= '9':
			j := i
			for j < len(src) && src[j] >= '0' && src[j] <= '9' {
				j++
			}
			if j+1 < len(src) && src[j] == '.' && src[j+1] >= '0' && src[j+1] <= '9' {
				j++
				for j < len(src) && src[j] >= '0' && src[j] <= '9' {
					j++
				}
			}
			out = append(out, token{tNumber, src[i:j], i})
			i = j
		case isIdentByte(c):
			j := i
			for j < len(src) && isIdentByte(src[j]) {
				j++
			}
			out = append(out, token{tIdent, src[i:j], i})
			i = j
		default:
			two := ""
			if i+1 < len(src) {
				two = src[i : i+2]
			}
			switch two {
			case "<=", ">=", "!=", "!~":
				out = append(out, token{tOp, two, i})
				i += 2
				continue
			}
			if strings.IndexByte(".[](),+-*/&|<>=~{}", c) < 0 {
				return nil, bad(fmt.Sprintf("unexpected character %q", c))
			}
			out = append(out, token{tOp, string(c), i})
			i++
		}
	}
	return append(out, token{tEOF, "", len(src)}), nil
}

func isIdentByte(c byte) bool {
	return c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c >= 0x80
}

// unquote reads a quoted string starting at s[0]==q and returns its value and
// the number of bytes consumed.
func unquote(s string, q byte) (string, int, error) {
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		c := s[i]
		if c == q {
			return b.String(), i + 1, nil
		}
		if c != '\\' {
			b.WriteByte(c)
			continue
		}
		i++
		if i >= len(s) {
			break
		}
		switch s[i] {
		case 'n':
			b.WriteByte('\n')
		case 't':
			b.WriteByte('\t')
		case 'r':
			b.WriteByte('\r')
		case 'f':
			b.WriteByte('\f')
		case 'u':
			if i+4 >= len(s) {
				return "", 0, fmt.Errorf("bad \\u escape")
			}
			var r rune
			if _, err := fmt.Sscanf(s[i+1:i+5], "%04x", &r); err != nil {
				return "", 0, fmt.Errorf("bad \\u escape")
			}
			b.WriteRune(r)
			i += 4
		default:
			b.WriteByte(s[i]) // \' \" \` \\ \/
		}
	}
	return "", 0, fmt.Errorf("unterminated string")
}

// node kinds of the syntax tree.
type nodeKind int

const (
	nLiteral nodeKind = iota // val
	nEmpty                   // {}
	nMember                  // name: navigate a child element of each input item
	nCall                    // name(args...) on the input
	nConst                   // %name
	nVar                     // $this, $index
	nDot                     // left.right: right evaluated on left's result
	nIndex                   // left[args[0]]
	nBinary                  // left op right
	nUnary                   // op left
	nTypeOp                  // left is/as typeName
)

// Node is a parsed FHIRPath expression.
type node struct {
	kind        nodeKind
	name        string // member, function, constant, variable, operator or type name
	val         Item   // literal
	left, right *node
	args        []*node
	pos         int
}

type parser struct {
	src   string
	toks  []token
	i     int
	depth int
}

// maxDepth bounds nesting, so that a hostile expression cannot exhaust the
// stack (a Go stack overflow is fatal, not a recoverable panic).
const maxDepth = 200

func (p *parser) peek() token { return p.toks[p.i] }
func (p *parser) next() token { t := p.toks[p.i]; p.i++; return t }
func (p *parser) fail(t token, format string, a ...any) error {
	return &Error{Expr: p.src, Pos: t.pos, Msg: fmt.Sprintf(format, a...)}
}

// binding powers of the infix operators, from FHIRPath's precedence table.
func infixPower(t token) int {
	if t.kind == tOp {
		switch t.text {
		case ".", "[":
			return 100
		case "*", "/":
			return 80
		case "+", "-", "&":
			return 70
		case "|":
			return 50
		case "<", ">", "<=", ">=":
			return 40
		case "=", "~", "!=", "!~":
			return 30
		}
	}
	if t.kind == tIdent {
		switch t.text {
		case "div", "mod":
			return 80
		case "is", "as":
			return 60
		case "in", "contains":
			return 25
		case "and":
			return 20
		case "or", "xor":
			return 15
		case "implies":
			return 10
		}
	}
	return 0
}

func (p *parser) expr(minPower int) (*node, error) {
	p.depth++
	defer func() { p.depth-- }()
	if p.depth > maxDepth {
		return nil, p.fail(p.peek(), "expression nested more than %d deep", maxDepth)
	}
	left, err := p.prefix()
	if err != nil {
		return nil, err
	}
	for {
		t := p.peek()
		pw := infixPower(t)
		if pw == 0 || pw <= minPower {
			return left, nil
		}
		p.next()
		switch {
		case t.text == ".":
			right, err := p.invocation()
			if err != nil {
				return nil, err
			}
			left = &node{kind: nDot, left: left, right: right, pos: t.pos}
		case t.text == "[":
			idx, err := p.expr(0)
			if err != nil {
				return nil, err
			}
			if c := p.next(); c.text != "]" || c.kind != tOp {
				return nil, p.fail(c, "expected ]")
			}
			left = &node{kind: nIndex, left: left, args: []*node{idx}, pos: t.pos}
		case t.kind == tIdent && (t.text == "is" || t.text == "as"):
			typ, err := p.typeSpecifier()
			if err != nil {
				return nil, err
			}
			left = &node{kind: nTypeOp, name: t.text, left: left, val: Item{V: typ}, pos: t.pos}
		default:
			right, err := p.expr(pw)
			if err != nil {
				return nil, err
			}
			left = &node{kind: nBinary, name: t.text, left: left, right: right, pos: t.pos}
		}
	}
}

func (p *parser) typeSpecifier() (string, error) {
	t := p.next()
	if t.kind != tIdent {
		return "", p.fail(t, "expected a type name")
	}
	name := t.text
	for p.peek().text == "." && p.toks[p.i+1].kind == tIdent {
		p.next()
		name += "." + p.next().text
	}
	return name, nil
}

func (p *parser) prefix() (*node, error) {
	t := p.next()
	switch t.kind {
	case tString:
		return &node{kind: nLiteral, val: Item{V: t.text, T: "string"}, pos: t.pos}, nil
	case tNumber:
		typ := "integer"
		if strings.Contains(t.text, ".") {
			typ = "decimal"
		}
		return &node{kind: nLiteral, val: Item{V: numberLit(t.text), T: typ}, pos: t.pos}, nil
	case tDate:
		return &node{kind: nLiteral, val: dateLiteral(t.text), pos: t.pos}, nil
	case tConst:
		return &node{kind: nConst, name: t.text, pos: t.pos}, nil
	case tVar:
		switch t.text {
		case "$this", "$index", "$total":
			return &node{kind: nVar, name: t.text, pos: t.pos}, nil
		}
		return nil, p.fail(t, "unknown variable %s", t.text)
	case tIdent:
		switch t.text {
		case "true", "false":
			if p.peek().text != "(" {
				return &node{kind: nLiteral, val: Item{V: t.text == "true", T: "boolean"}, pos: t.pos}, nil
			}
		}
		p.i--
		return p.invocation()
	case tOp:
		switch t.text {
		case "(":
			e, err := p.expr(0)
			if err != nil {
				return nil, err
			}
			if c := p.next(); c.text != ")" || c.kind != tOp {
				return nil, p.fail(c, "expected )")
			}
			return e, nil
		case "{":
			if c := p.next(); c.text != "}" {
				return nil, p.fail(c, "expected } of the empty collection {}")
			}
			return &node{kind: nEmpty, pos: t.pos}, nil
		case "-", "+":
			operand, err := p.expr(90)
			if err != nil {
				return nil, err
			}
			return &node{kind: nUnary, name: t.text, left: operand, pos: t.pos}, nil
		}
	}
	if t.kind == tEOF {
		return nil, p.fail(t, "unexpected end of expression")
	}
	return nil, p.fail(t, "unexpected %q", t.text)
}

// invocation is a member name or a function call.
func (p *parser) invocation() (*node, error) {
	t := p.next()
	if t.kind == tVar {
		return &node{kind: nVar, name: t.text, pos: t.pos}, nil
	}
	if t.kind != tIdent {
		return nil, p.fail(t, "expected an element or function name, got %q", t.text)
	}
	if p.peek().text != "(" || p.peek().kind != tOp {
		return &node{kind: nMember, name: t.text, pos: t.pos}, nil
	}
	p.next()
	n := &node{kind: nCall, name: t.text, pos: t.pos}
	if p.peek().text == ")" {
		p.next()
	} else {
		for {
			a, err := p.expr(0)
			if err != nil {
				return nil, err
			}
			n.args = append(n.args, a)
			c := p.next()
			if c.text == ")" {
				break
			}
			if c.text != "," {
				return nil, p.fail(c, "expected , or ) in the arguments of %s()", t.text)
			}
		}
	}
	f, ok := funcs[n.name]
	if !ok {
		return nil, p.fail(t, "function %s() is not supported", n.name)
	}
	if len(n.args) < f.minArgs || len(n.args) > f.maxArgs {
		return nil, p.fail(t, "%s() takes %d to %d arguments, got %d", n.name, f.minArgs, f.maxArgs, len(n.args))
	}
	return n, nil
}

func dateLiteral(s string) Item {
	switch {
	case strings.HasPrefix(s, "T"):
		return Item{V: s[1:], T: "time"}
	case strings.Contains(s, "T"):
		return Item{V: strings.TrimSuffix(s, "T"), T: "dateTime"}
	}
	return Item{V: s, T: "date"}
}

// Expr is a compiled FHIRPath expression.
type Expr struct {
	src  string
	root *node
}

// String returns the source text.
func (e *Expr) String() string { return e.src }

// Parse compiles src.
func Parse(src string) (*Expr, error) {
	toks, err := lex(src)
	if err != nil {
		return nil, err
	}
	p := &parser{src: src, toks: toks}
	root, err := p.expr(0)
	if err != nil {
		return nil, err
	}
	if t := p.peek(); t.kind != tEOF {
		return nil, p.fail(t, "unexpected %q after the end of the expression", t.text)
	}
	return &Expr{src: src, root: root}, nil
}

// Constants lists the %names the expression refers to, for checking that a
// caller defines them before evaluation.
func (e *Expr) Constants() []string {
	var out []string
	var walk func(n *node)
	walk = func(n *node) {
		if n == nil {
			return
		}
		if n.kind == nConst {
			out = append(out, n.name)
		}
		walk(n.left)
		walk(n.right)
		for _, a := range n.args {
			walk(a)
		}
	}
	walk(e.root)
	return out
}

func isUpper(s string) bool {
	return s != "" && unicode.IsUpper(rune(s[0]))
}
