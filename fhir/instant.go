package fhir

import (
	"fmt"
	"regexp"
	"time"
)

var dateTimePattern = regexp.MustCompile(`^(\d{4})(-(\d{2})(-(\d{2})(T(\d{2}):(\d{2})(:(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$`)

// Precision is how much of a date-time a value gave.
type Precision int

const (
	Year Precision = iota
	Month
	Day
	Second
)

// ParseDateTime reads a FHIR date, dateTime or instant and returns the start
// of the period it names, its end (exclusive) and its precision. A value
// without a zone is read as UTC. Seconds may be left out (search values
// such as 2020-01-01T10:00 are common).
func ParseDateTime(s string) (start, end time.Time, p Precision, err error) {
	m := dateTimePattern.FindStringSubmatch(s)
	if m == nil {
		return time.Time{}, time.Time{}, 0, fmt.Errorf("%q is not a FHIR date or instant (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.fff]Z)", s)
	}
	switch {
	case m[6] != "":
		if m[12] == "" {
			m[12] = "Z"
		}
		sec := m[10]
		if sec == "" {
			sec = "00"
		}
		t, perr := time.Parse(time.RFC3339Nano, fmt.Sprintf("%s-%s-%sT%s:%s:%s%s%s", m[1], m[3], m[5], m[7], m[8], sec, m[11], m[12]))
		if perr != nil {
			return time.Time{}, time.Time{}, 0, fmt.Errorf("%q is not a valid instant: %v", s, perr)
		}
		step := time.Second
		if m[11] != "" {
			step = time.Nanosecond
		}
		return t.UTC(), t.UTC().Add(step), Second, nil
	case m[5] != "":
		t, perr := time.Parse("2006-01-02", s)
		if perr != nil {
			return time.Time{}, time.Time{}, 0, fmt.Errorf("%q is not a valid date: %v", s, perr)
		}
		return t, t.AddDate(0, 0, 1), Day, nil
	case m[3] != "":
		t, perr := time.Parse("2006-01", s)
		if perr != nil {
			return time.Time{}, time.Time{}, 0, fmt.Errorf("%q is not a valid month: %v", s, perr)
		}
		return t, t.AddDate(0, 1, 0), Month, nil
	default:
		t, perr := time.Parse("2006", s)
		if perr != nil {
			return time.Time{}, time.Time{}, 0, fmt.Errorf("%q is not a valid year: %v", s, perr)
		}
		return t, t.AddDate(1, 0, 0), Year, nil
	}
}

// FormatInstant renders t as a FHIR instant in UTC with millisecond precision.
func FormatInstant(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000Z07:00")
}
