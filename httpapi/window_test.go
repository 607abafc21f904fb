package httpapi_test

import (
	"context"
	"encoding/json"
	"net/url"
	"slices"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
)

// pinnedClock is the store's lastUpdated clock, set by the test.
type pinnedClock struct{ ms atomic.Int64 }

func (c *pinnedClock) set(t time.Time) { c.ms.Store(t.UnixMilli()) }

// pinClock hands the store's clock to the test (both stores have the hook).
func pinClock(t *testing.T, e *env) *pinnedClock {
	t.Helper()
	s, ok := e.db.(interface{ SetClock(func() time.Time) })
	if !ok {
		t.Fatalf("store %T has no clock hook", e.db)
	}
	c := &pinnedClock{}
	s.SetClock(func() time.Time { return time.UnixMilli(c.ms.Load()) })
	return c
}

// TestExportWindowBoundaries (issue 19, finding 3): _since is exclusive and
// _until inclusive, both at the stored millisecond, on every path that
// compares them — a system export's range scan, patient batches, the
// supporting resources, a resource changed after the snapshot (read as of
// it), and deletions with and without a patient list. For each boundary
// (a resource's lastUpdated or a deletion's, in millisecond, second and
// zone-offset forms) _until=X then _since=X covers every change exactly
// once, and what sits at X is on the _until side.
func TestExportWindowBoundaries(t *testing.T) {
	// Forty exports wait for workers at once.
	e := newEnv(t, envOpts{noWorkers: true, exportCfg: export.Config{MaxActiveJobs: 100, MaxActiveJobsPerOwner: 100}})
	clock := pinClock(t, e)
	day := time.Date(2025, 3, 1, 0, 0, 0, 0, time.UTC)
	at := func(hms string) time.Time {
		d, err := time.Parse("15:04:05.000", hms)
		if err != nil {
			t.Fatal(err)
		}
		return day.Add(d.Sub(time.Date(0, 1, 1, 0, 0, 0, 0, time.UTC)))
	}
	stamped := map[string]time.Time{} // type/id → lastUpdated of the version exported
	gone := map[string]time.Time{}    // type/id → lastUpdated of its deletion
	write := func(when string, bodies ...string) {
		t.Helper()
		clock.set(at(when))
		put(t, e, bodies...)
		for _, b := range bodies {
			var r struct{ ResourceType, ID string }
			json.Unmarshal([]byte(b), &r)
			stamped[r.ResourceType+"/"+r.ID] = at(when)
		}
	}
	remove := func(when, typ, id string) {
		t.Helper()
		clock.set(at(when))
		if _, err := e.db.Write(context.Background(), []kiln.Write{{Kind: kiln.Delete, Type: typ, ID: id}}); err != nil {
			t.Fatal(err)
		}
		delete(stamped, typ+"/"+id)
		gone[typ+"/"+id] = at(when)
	}

	write("09:00:00.000", `{"resourceType":"Patient","id":"p"}`,
		`{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/p"}}]}`)
	write("09:30:00.000", obs("o-gone-ms", "p", ""), obs("o-gone-sec", "p", ""))
	write("10:00:00.250", obs("o-ms", "p", `,"performer":[{"reference":"Practitioner/dr"}]`), obs("o-upd", "p", ""),
		`{"resourceType":"Practitioner","id":"dr"}`)
	write("10:00:01.000", obs("o-sec", "p", ""))
	remove("10:00:02.500", "Observation", "o-gone-ms")
	remove("10:00:03.000", "Observation", "o-gone-sec")
	write("10:00:04.000", obs("o-late", "p", ""))
	clock.set(at("10:00:05.000"))

	const floor = "2025-03-01T08:00:00Z" // before every write: _until exports list deletions too
	bounds := []string{
		"2025-03-01T10:00:00.250Z",      // o-ms, o-upd and dr, to the millisecond
		"2025-03-01T10:00:01Z",          // o-sec, to the second
		"2025-03-01T11:00:01.000+01:00", // the same instant in another zone
		"2025-03-01T10:00:02.500Z",      // o-gone-ms's deletion
		"2025-03-01T10:00:03Z",          // o-gone-sec's deletion
	}
	levels := []string{"/$export", "/Group/g/$export", "/Patient/$export", "/Patient/$export?patient=Patient/p"}
	type run struct {
		level, bound string
		until        bool // the _since=floor&_until=bound side
		loc          string
	}
	var runs []run
	for _, level := range levels {
		for _, b := range bounds {
			for _, until := range []bool{true, false} {
				q := "_since=" + url.QueryEscape(b)
				if until {
					q = "_since=" + floor + "&_until=" + url.QueryEscape(b)
				}
				runs = append(runs, run{level, b, until, e.kickOff("GET", level+sep(level)+q, nil)})
			}
		}
	}
	// Every export has its snapshot; o-upd changes after all of them, so
	// each must read its version as of the snapshot (stamped at 10:00:00.250).
	clock.set(at("10:00:06.000"))
	put(t, e, obs("o-upd", "p", `,"valueString":"after the snapshot"`))
	e.startWorkers()

	for _, r := range runs {
		m := e.mustComplete(r.loc)
		b := parseInstant(t, r.bound)
		in := func(lu time.Time) bool {
			if r.until {
				return !lu.After(b)
			}
			return lu.After(b)
		}
		var want, wantGone []string
		for ref, lu := range stamped {
			if in(lu) { // Group g is in p's compartment (Group.member), so at every level
				want = append(want, ref)
			}
		}
		for ref, lu := range gone {
			if in(lu) {
				wantGone = append(wantGone, ref)
			}
		}
		side := "_since=" + r.bound
		if r.until {
			side = "_until=" + r.bound
		}
		got := exportedRefs(t, e, m)
		if sort.Strings(want); !slices.Equal(got, want) {
			t.Errorf("%s %s: exported %v, want %v", r.level, side, got, want)
		}
		if sort.Strings(wantGone); !slices.Equal(deletedRefs(t, e, m), wantGone) {
			t.Errorf("%s %s: deleted %v, want %v", r.level, side, deletedRefs(t, e, m), wantGone)
		}
	}
}

// TestSinceTransactionTime: a resource stamped in the very millisecond of
// an export's transactionTime is in that export and not in the next one
// asked _since=<transactionTime>; _until=<transactionTime> is the whole
// export again.
func TestSinceTransactionTime(t *testing.T) {
	e := newEnv(t, envOpts{})
	clock := pinClock(t, e)
	t0 := time.Date(2025, 3, 1, 10, 0, 0, 0, time.UTC)
	clock.set(t0)
	put(t, e, `{"resourceType":"Patient","id":"p"}`, obs("o-at-t", "p", ""))
	// The kick-off snapshot comes in the same millisecond as the write.
	m := e.mustComplete(e.kickOff("GET", "/$export", nil))
	if tt, _ := time.Parse(time.RFC3339Nano, m.TransactionTime); !tt.Equal(t0) {
		t.Fatalf("transactionTime %s, want the pinned %s", m.TransactionTime, t0.Format(time.RFC3339Nano))
	}
	if got := exportedRefs(t, e, m); !slices.Equal(got, []string{"Observation/o-at-t", "Patient/p"}) {
		t.Fatalf("export as of T: %v", got)
	}
	put(t, e, obs("o-after", "p", "")) // the same pinned millisecond, but after the snapshot
	for _, tc := range []struct {
		query string
		want  []string
	}{
		{"_since=" + url.QueryEscape(m.TransactionTime), []string{"Observation/o-after"}},
		{"_since=2025-03-01T10:00:00Z", []string{"Observation/o-after"}}, // T at second precision
		{"_since=2025-03-01T09:00:00Z&_until=" + url.QueryEscape(m.TransactionTime), []string{"Observation/o-at-t", "Patient/p"}},
	} {
		for _, level := range []string{"/$export", "/Patient/$export"} {
			got := exportedRefs(t, e, e.mustComplete(e.kickOff("GET", level+"?"+tc.query, nil)))
			if !slices.Equal(got, tc.want) {
				t.Errorf("%s?%s: %v, want %v", level, tc.query, got, tc.want)
			}
		}
	}
}

func parseInstant(t *testing.T, s string) time.Time {
	t.Helper()
	v, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// exportedRefs downloads every output file and returns type/id of each
// resource, sorted; a resource exported twice is an error.
func exportedRefs(t *testing.T, e *env, m manifest) []string {
	t.Helper()
	var refs []string
	for typ, ids := range e.exported(m) {
		for _, id := range ids {
			refs = append(refs, typ+"/"+id)
		}
	}
	sort.Strings(refs)
	if c := slices.Compact(slices.Clone(refs)); len(c) != len(refs) {
		t.Errorf("a resource exported twice: %v", refs)
	}
	return refs
}

// deletedRefs reads the manifest's deleted files: type/id of each DELETE, sorted.
func deletedRefs(t *testing.T, e *env, m manifest) []string {
	t.Helper()
	var refs []string
	for _, it := range m.Deleted {
		for _, l := range e.lines(it.URL, false) {
			var b struct {
				Entry []struct{ Request struct{ Method, URL string } }
			}
			if err := json.Unmarshal(l, &b); err != nil || len(b.Entry) != 1 || b.Entry[0].Request.Method != "DELETE" {
				t.Fatalf("deleted line %s: %v", l, err)
			}
			refs = append(refs, b.Entry[0].Request.URL)
		}
	}
	sort.Strings(refs)
	return refs
}
