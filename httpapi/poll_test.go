package httpapi_test

import (
	"testing"
	"time"

	"github.com/kiln-fhir/kiln/httpapi"
)

// TestStatusPreferWait: a status poll with Prefer: wait=N is held until the
// job ends and then answers with the manifest; without the preference (or
// when the wait runs out) the poll answers 202 at once.
func TestStatusPreferWait(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true})
	put(t, e, `{"resourceType":"Patient","id":"a"}`, obs("o1", "a", ""))
	loc := e.kickOff("GET", "/$export", nil)
	if r := e.do("GET", loc, nil); r.StatusCode != 202 {
		t.Fatalf("plain poll before workers run: %d", r.StatusCode)
	}
	// No worker runs, so a short wait runs out and answers 202.
	if r := e.do("GET", loc, nil, "Prefer", "wait=1"); r.StatusCode != 202 {
		t.Fatalf("wait=1 with no worker: %d", r.StatusCode)
	}
	// A poll held with wait=30 sees the job finish once workers start: it
	// answers 200 with the manifest, not the 202 it would answer at once.
	held := make(chan response, 1)
	go func() { held <- e.do("GET", loc, nil, "Prefer", "respond-async, wait=30") }()
	e.startWorkers()
	r := <-held
	if r.StatusCode != 200 {
		t.Fatalf("held poll: %d, want 200 once the job ends", r.StatusCode)
	}
	if m := r.json(t); m["transactionTime"] == nil {
		t.Fatalf("held poll answered without a manifest: %v", m)
	}
}

// TestPreferWaitIgnoredWhenMalformed: a bad wait value is ignored (RFC 7240
// preferences are optional), never a client error.
func TestPreferWaitIgnoredWhenMalformed(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true})
	put(t, e, `{"resourceType":"Patient","id":"a"}`)
	loc := e.kickOff("GET", "/$export", nil)
	for _, v := range []string{"wait=abc", "wait=-3", "wait=", "wait"} {
		if r := e.do("GET", loc, nil, "Prefer", v); r.StatusCode != 202 {
			t.Errorf("Prefer: %s: %d, want 202", v, r.StatusCode)
		}
	}
}

// TestStatusRetryAfterShrinks: Retry-After follows the job's rate, so it
// shrinks as the job nears its end, stays within [1, base], and is base
// before any progress.
func TestStatusRetryAfterShrinks(t *testing.T) {
	const base = 10
	elapsed := 20 * time.Second
	prev := base + 1
	for _, pct := range []int{0, 10, 50, 67, 80, 95, 99} {
		got := httpapi.StatusRetryAfter(base, pct, elapsed)
		if got < 1 || got > base {
			t.Fatalf("%d%%: Retry-After %d outside [1, %d]", pct, got, base)
		}
		if got > prev {
			t.Fatalf("%d%%: Retry-After %d grew from %d", pct, got, prev)
		}
		prev = got
	}
	for _, c := range []struct {
		pct     int
		elapsed time.Duration
		want    int
	}{
		{0, elapsed, base},           // no progress yet: the configured delay
		{50, 4 * time.Second, 4},     // half done in 4 s: 4 s more
		{80, 8 * time.Second, 2},     // 80% in 8 s: 2 s more
		{95, 19 * time.Second, 1},    // 1 s more
		{99, 2 * time.Second, 1},     // never below one second
		{10, 30 * time.Second, base}, // 270 s more: capped at base
		{60, 5 * time.Second, 4},     // 3.33 s more rounds up
		{100, 3 * time.Second, base}, // finished jobs carry no Retry-After; base is harmless
	} {
		if got := httpapi.StatusRetryAfter(base, c.pct, c.elapsed); got != c.want {
			t.Errorf("StatusRetryAfter(%d, %d%%, %v) = %d, want %d", base, c.pct, c.elapsed, got, c.want)
		}
	}
}
