package fhirpath

import (
	"encoding/json"
	"regexp"
	"strconv"
	"strings"
	"time"
)

var (
	datePattern = regexp.MustCompile(`^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$`)
	timePattern = regexp.MustCompile(`^(\d{2})(?::(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?$`)
	tzPattern   = regexp.MustCompile(`(Z|[+-]\d{2}:\d{2})$`)
)

// boundary is lowBoundary()/highBoundary() without a precision argument: a
// decimal widened by half a unit of its last digit; a partial date, dateTime
// or time filled to millisecond precision (dateTime with the widest time
// zone, +14:00 low and -12:00 high, when it has none).
func boundary(n *node, in []Item, high bool) ([]Item, error) {
	if len(n.args) > 0 {
		return nil, evalErr(n, "%s() with a precision argument is not supported", n.name)
	}
	if len(in) == 0 {
		return nil, nil
	}
	if len(in) > 1 {
		return nil, evalErr(n, "%s() needs a single input item", n.name)
	}
	it := in[0]
	if _, _, _, ok := number(it); ok {
		s, _ := toString(it)
		digits := 0
		if i := strings.IndexByte(s, '.'); i >= 0 {
			digits = len(s) - i - 1
		}
		_, f, _, _ := number(it)
		half := 0.5
		for range digits {
			half /= 10
		}
		if high {
			f += half
		} else {
			f -= half
		}
		return []Item{{V: json.Number(strconv.FormatFloat(f, 'f', digits+1, 64)), T: "decimal"}}, nil
	}
	s, ok := it.V.(string)
	if !ok {
		return nil, nil
	}
	typ := it.T
	if typ == "" || typ == "string" {
		switch {
		case datePattern.MatchString(s):
			typ = "date"
		case strings.Contains(s, "T") && datePattern.MatchString(s[:strings.IndexByte(s, 'T')]):
			typ = "dateTime"
		case timePattern.MatchString(s):
			typ = "time"
		}
	}
	switch typ {
	case "date":
		d, ok := dateBound(s, high)
		if !ok {
			return nil, nil
		}
		return []Item{{V: d, T: "date"}}, nil
	case "time":
		t, ok := timeBound(s, high)
		if !ok {
			return nil, nil
		}
		return []Item{{V: t, T: "time"}}, nil
	case "dateTime", "instant":
		date, tm, _ := strings.Cut(s, "T")
		tz := tzPattern.FindString(tm)
		tm = strings.TrimSuffix(tm, tz)
		d, ok := dateBound(date, high)
		if !ok {
			return nil, nil
		}
		t, ok := timeBound(tm, high)
		if !ok {
			return nil, nil
		}
		if tz == "" {
			tz = "+14:00"
			if high {
				tz = "-12:00"
			}
		}
		return []Item{{V: d + "T" + t + tz, T: "dateTime"}}, nil
	}
	return nil, nil
}

func dateBound(s string, high bool) (string, bool) {
	m := datePattern.FindStringSubmatch(s)
	if m == nil {
		return "", false
	}
	y, _ := strconv.Atoi(m[1])
	mon, day := 1, 1
	if high {
		mon = 12
	}
	if m[2] != "" {
		mon, _ = strconv.Atoi(m[2])
	}
	if m[3] != "" {
		day, _ = strconv.Atoi(m[3])
	} else if high {
		day = time.Date(y, time.Month(mon)+1, 0, 0, 0, 0, 0, time.UTC).Day()
	}
	return time.Date(y, time.Month(mon), day, 0, 0, 0, 0, time.UTC).Format("2006-01-02"), true
}

func timeBound(s string, high bool) (string, bool) {
	if s == "" {
		s = "00"
		if high {
			s = "23"
		}
	}
	m := timePattern.FindStringSubmatch(s)
	if m == nil {
		return "", false
	}
	fill := func(v, low, hi string) string {
		if v != "" {
			return v
		}
		if high {
			return hi
		}
		return low
	}
	frac := m[4]
	if frac == "" {
		frac = fill("", "000", "999")
	}
	for len(frac) < 3 {
		frac += fill("", "0", "9")
	}
	return m[1] + ":" + fill(m[2], "00", "59") + ":" + fill(m[3], "00", "59") + "." + frac, true
}
