package pull_test

import (
	"context"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln/pull"
)

// TestWatermarkNeverFromAnUnfinishedRun: an incremental pull killed during
// its downloads leaves manifest.json (the --since-last watermark) at the
// previous run, and a new --since-last is refused until it is resumed; a
// file that failed is not counted as downloaded.
func TestWatermarkNeverFromAnUnfinishedRun(t *testing.T) {
	s := newServer(t, false)
	dir := t.TempDir()
	pullAll(t, pull.New(pull.Options{Out: dir}), pull.Request{Server: s.base, Types: []string{"Patient", "Condition"}})
	first, err := pull.PreviousTransactionTime(dir)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Millisecond) // a later transactionTime than the first run's
	ctx, cancel := context.WithCancel(context.Background())
	var seen atomic.Int32
	interrupting := &http.Client{Transport: roundTrip(func(r *http.Request) (*http.Response, error) {
		if strings.Contains(r.URL.Path, "/file/") && seen.Add(1) > 1 {
			cancel()
			return nil, context.Canceled
		}
		return http.DefaultTransport.RoundTrip(r)
	})}
	c := pull.New(pull.Options{Out: dir, Parallel: 1, HTTP: interrupting})
	st, err := c.Start(ctx, pull.Request{Server: s.base, Since: "2000-01-01T00:00:00Z", Incremental: true})
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.Wait(ctx, st)
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.Download(ctx, st, m)
	if err == nil {
		t.Fatal("interrupted download reported success")
	}
	if res.Files > 1 {
		t.Errorf("%d files counted as downloaded, only 1 was", res.Files)
	}
	if _, err := pull.PreviousTransactionTime(dir); err == nil || !strings.Contains(err.Error(), "unfinished") {
		t.Fatalf("watermark of an unfinished run: %v", err)
	}
	c2 := pull.New(pull.Options{Out: dir})
	st2, _ := c2.Resume()
	m2, err := c2.Wait(context.Background(), st2)
	if err != nil {
		t.Fatal(err)
	}
	// Until the run commits, the folder shows none of its files.
	if run, _ := filepath.Glob(filepath.Join(dir, "*."+st.RunID+".*")); len(run) != 0 {
		t.Fatalf("files of the unfinished run in the folder: %v", run)
	}
	if _, err := c2.Download(context.Background(), st2, m2); err != nil {
		t.Fatal(err)
	}
	if got, _ := pull.PreviousTransactionTime(dir); got == first || got != m2.TransactionTime {
		t.Fatalf("after commit the watermark is %s, want %s", got, m2.TransactionTime)
	}
}
