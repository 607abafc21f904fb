package httpapi_test

import (
	"encoding/json"
	"net/url"
	"slices"
	"strings"
	"testing"
)

// TestSearchCursorsAreOpaque (issue 17): a search's next link carries no
// store row id (which would count every tenant's writes), a second server
// on the same store follows it, and a cursor not given out for this search
// — a number, a well-formed block made without the key, one from a search
// of another type — is a 400 naming _cursor.
func TestSearchCursorsAreOpaque(t *testing.T) {
	dir := t.TempDir()
	e := newEnv(t, envOpts{dir: dir, noWorkers: true})
	for _, id := range []string{"a", "b", "c", "d", "e"} {
		put(t, e, `{"resourceType":"Patient","id":"`+id+`"}`)
	}
	page := func(e *env, u string) ([]string, string) {
		t.Helper()
		res := e.do("GET", u, nil)
		if res.StatusCode != 200 {
			t.Fatalf("GET %s: %d %s", u, res.StatusCode, res.body)
		}
		var b struct {
			Link  []struct{ Relation, URL string }
			Entry []struct{ Resource struct{ ID string } }
		}
		json.Unmarshal(res.body, &b)
		var ids []string
		for _, en := range b.Entry {
			ids = append(ids, en.Resource.ID)
		}
		next := ""
		for _, l := range b.Link {
			if l.Relation == "next" {
				next = l.URL
			}
		}
		return ids, next
	}
	ids, next := page(e, "/Patient?_count=2")
	u, _ := url.Parse(next)
	cursor := u.Query().Get("_cursor")
	if cursor == "" || strings.Trim(cursor, "0123456789") == "" || len(cursor) < 20 {
		t.Fatalf("next link %s: cursor %q", next, cursor)
	}
	// Another server on the same store follows it.
	e2 := newEnv(t, envOpts{dir: dir, noWorkers: true})
	for next != "" {
		var more []string
		more, next = page(e2, strings.Replace(next, e.base, e2.base, 1))
		ids = append(ids, more...)
	}
	if slices.Sort(ids); !slices.Equal(ids, []string{"a", "b", "c", "d", "e"}) {
		t.Errorf("pages: %v", ids)
	}
	for _, bad := range []string{"3", "AAAAAAAAAAAAAAAAAAAAAA", cursor[:len(cursor)-2] + "AA", "not base64!", "other type"} {
		path := "/Patient?_count=2&_cursor=" + url.QueryEscape(bad)
		if bad == "other type" {
			path = "/Observation?_count=2&_cursor=" + url.QueryEscape(cursor)
		}
		res := e.do("GET", path, nil)
		if res.StatusCode != 400 || !strings.Contains(string(res.body), `"expression":["_cursor"]`) {
			t.Errorf("_cursor=%s: %d %s", bad, res.StatusCode, res.body)
		}
	}
}
