// Package kiln holds Kiln's domain: the types that flow between the HTTP API,
// the export engine and the stores, and the interfaces each backend implements.
// It depends on nothing but the standard library.
package kiln

import (
	"errors"
	"fmt"
)

// Version is the release of this build; cmd/kiln may override it with -ldflags.
var Version = "0.1.0-dev"

// Error codes. Every layer returns an *Error with one of these; the HTTP layer
// alone turns a code into a status and an OperationOutcome issue code.
const (
	ECONFLICT     = "conflict"      // 409, version or uniqueness conflict
	EINVALID      = "invalid"       // 400, the request is wrong
	ENOTFOUND     = "not-found"     // 404
	EGONE         = "gone"          // 410, deleted resource
	EUNAUTHORIZED = "unauthorized"  // 401
	EFORBIDDEN    = "forbidden"     // 403
	ETOOLARGE     = "too-large"     // 413
	ETHROTTLED    = "throttled"     // 429
	EPRECONDITION = "precondition"  // 412
	EUNSUPPORTED  = "not-supported" // 415/405
	EINTERNAL     = "internal"      // 500, logged in full, shown as "internal error"
)

// TransientChecker is implemented by stores that can tell a passing outage (a
// restarting database, a dropped connection) from a real failure. Work that
// fails transiently is retried, not failed: an export outlives a database
// restart, and a REST client gets 503 with Retry-After instead of 500.
type TransientChecker interface {
	Transient(err error) bool
}

// Transient reports whether store judges err a passing outage; false when
// store cannot tell.
func Transient(store any, err error) bool {
	c, ok := store.(TransientChecker)
	return ok && err != nil && c.Transient(err)
}

// Error is a domain error. Expression names where the problem is (a parameter
// name, a FHIRPath such as Patient.name[0].given, or file:line).
type Error struct {
	Code       string
	Message    string
	Expression []string
	// RetryAfter, in seconds, for ETHROTTLED.
	RetryAfter int
	// Issues carries further problems found in the same input, beyond Message.
	Issues []Issue
}

// Issue is one problem in an input, located by Expression.
type Issue struct {
	Expression string
	Message    string
}

func (e *Error) Error() string {
	if len(e.Expression) > 0 {
		return fmt.Sprintf("%s: %s (at %v)", e.Code, e.Message, e.Expression)
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

// Errorf returns an *Error with the given code.
func Errorf(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Invalid returns an EINVALID error located at expr.
func Invalid(expr, format string, args ...any) *Error {
	return &Error{Code: EINVALID, Message: fmt.Sprintf(format, args...), Expression: []string{expr}}
}

// ErrorCode returns the code of err, or EINTERNAL for errors that are not *Error.
func ErrorCode(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return EINTERNAL
}

// ErrorMessage returns the client-facing message of err; internal errors are not shown.
func ErrorMessage(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Message
	}
	return "internal error"
}
