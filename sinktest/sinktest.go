// Package sinktest is the contract every export sink must meet: one suite,
// run against each implementation (local files, S3 with and without a key
// prefix).
package sinktest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln"
)

// Options describe the sink under test.
type Options struct {
	// PartSize is the multipart part size to write with (0: the sink's own).
	PartSize int64
	// Many is how many files the many-files test writes (1,050 by default:
	// past S3's 1,000 keys per listing page).
	Many int
}

// Run runs the contract; open returns a sink, the same or a new one on
// every call, that no other test writes to the jobs it is asked about.
func Run(t *testing.T, open func(t *testing.T) kiln.Sink, opt Options) {
	if opt.Many <= 0 {
		opt.Many = 1050
	}
	tests := []struct {
		name string
		fn   func(t *testing.T, s kiln.Sink, opt Options)
	}{
		{"RoundTripAndReplace", testRoundTrip},
		{"PartSizeBoundaries", testPartSizes},
		{"MissingIsNotFound", testMissing},
		{"RemovePrefixOnlyPrefix", testRemovePrefix},
		{"ManyFiles", testMany},
		{"AbortLeavesNothing", testAbort},
		{"URLs", testURLs},
		{"LocatedElsewhere", testLocated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.fn(t, open(t), opt) })
	}
}

// job is a job id no other subtest uses.
func job(t *testing.T) string {
	return "job-" + strings.NewReplacer("/", "-", " ", "-").Replace(t.Name())
}

func put(t *testing.T, s kiln.Sink, job, name string, data []byte, opt Options) {
	t.Helper()
	w, err := s.Create(context.Background(), job, name, kiln.WriteOptions{PartSize: opt.PartSize})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	// In lines, as the engine writes.
	for _, l := range bytes.SplitAfter(data, []byte("\n")) {
		if len(l) == 0 {
			continue
		}
		if _, err := w.Write(l); err != nil {
			t.Fatalf("write %s: %v", name, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatalf("close %s: %v", name, err)
	}
}

func get(t *testing.T, s kiln.Sink, job, name string) ([]byte, error) {
	t.Helper()
	r, err := s.Open(context.Background(), job, name)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	return io.ReadAll(r)
}

func mustGet(t *testing.T, s kiln.Sink, job, name string) []byte {
	t.Helper()
	b, err := get(t, s, job, name)
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	return b
}

func gone(t *testing.T, s kiln.Sink, job, name string) bool {
	t.Helper()
	_, err := get(t, s, job, name)
	if err != nil && kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("open %s: %v (want ENOTFOUND or the file)", name, err)
	}
	return err != nil
}

// data is n bytes of NDJSON lines.
func data(n int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, `{"resourceType":"Basic","id":"b%d","text":"%s"}`+"\n", i, strings.Repeat("x", 200))
	}
	out := b.Bytes()[:n]
	out[n-1] = '\n'
	return out
}

func testRoundTrip(t *testing.T, s kiln.Sink, opt Options) {
	j := job(t)
	put(t, s, j, "000001-a1-output-Patient-001.ndjson", []byte("one\ntwo\n"), opt)
	if got := mustGet(t, s, j, "000001-a1-output-Patient-001.ndjson"); string(got) != "one\ntwo\n" {
		t.Fatalf("read back %q", got)
	}
	put(t, s, j, "000001-a1-output-Patient-001.ndjson", []byte("three\n"), opt)
	if got := mustGet(t, s, j, "000001-a1-output-Patient-001.ndjson"); string(got) != "three\n" {
		t.Fatalf("after replacing: %q", got)
	}
	if err := s.RemoveJob(context.Background(), j); err != nil {
		t.Fatal(err)
	}
}

// testPartSizes: files one byte short of a part, exactly one and two parts,
// and one byte over, read back byte for byte.
func testPartSizes(t *testing.T, s kiln.Sink, opt Options) {
	part := opt.PartSize
	if part <= 0 {
		part = 5 << 20
	}
	j := job(t)
	for _, n := range []int64{part - 1, part, 2 * part, part + 1} {
		name := fmt.Sprintf("000001-a1-output-Basic-%d.ndjson", n)
		want := data(int(n))
		put(t, s, j, name, want, opt)
		if got := mustGet(t, s, j, name); !bytes.Equal(got, want) {
			t.Errorf("%d bytes written, %d read back (equal: %v)", n, len(got), bytes.Equal(got, want))
		}
	}
	if err := s.RemoveJob(context.Background(), j); err != nil {
		t.Fatal(err)
	}
}

func testMissing(t *testing.T, s kiln.Sink, _ Options) {
	if _, err := get(t, s, job(t), "nothing.ndjson"); kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("missing file: %v, want ENOTFOUND", err)
	}
	// Removing what is not there is no error.
	if err := s.RemovePrefix(context.Background(), job(t), "000009-"); err != nil {
		t.Fatal(err)
	}
	if err := s.RemoveJob(context.Background(), job(t)); err != nil {
		t.Fatal(err)
	}
}

// testRemovePrefix: a unit attempt's prefix removes that attempt's files
// only — not a later attempt's (a stale worker must not), another unit's,
// or another job's.
func testRemovePrefix(t *testing.T, s kiln.Sink, opt Options) {
	j, other := job(t), job(t)+"-other"
	names := []string{"000001-a1-output-Patient-001.ndjson", "000001-a1-output-Patient-002.ndjson",
		"000001-a2-output-Patient-003.ndjson", "000001-a10-output-Patient-004.ndjson", "000002-a1-output-Patient-005.ndjson"}
	for _, n := range names {
		put(t, s, j, n, []byte(n+"\n"), opt)
	}
	put(t, s, other, names[0], []byte("other\n"), opt)
	if err := s.RemovePrefix(context.Background(), j, "000001-a1-"); err != nil {
		t.Fatal(err)
	}
	for i, n := range names {
		if removed := gone(t, s, j, n); removed != (i < 2) {
			t.Errorf("%s removed %v after RemovePrefix(000001-a1-)", n, removed)
		}
	}
	if gone(t, s, other, names[0]) {
		t.Error("RemovePrefix reached another job")
	}
	for _, id := range []string{j, other} {
		if err := s.RemoveJob(context.Background(), id); err != nil {
			t.Fatal(err)
		}
	}
	if !gone(t, s, j, names[2]) || !gone(t, s, other, names[0]) {
		t.Error("RemoveJob left files")
	}
}

// testMany: more files than one S3 listing page holds; RemovePrefix and
// RemoveJob reach all of them.
func testMany(t *testing.T, s kiln.Sink, opt Options) {
	j := job(t)
	for i := range opt.Many {
		put(t, s, j, fmt.Sprintf("%06d-a1-output-Basic-%06d.ndjson", i%2, i), []byte("x\n"), opt)
	}
	if err := s.RemovePrefix(context.Background(), j, "000000-"); err != nil {
		t.Fatal(err)
	}
	for i := range opt.Many {
		name := fmt.Sprintf("%06d-a1-output-Basic-%06d.ndjson", i%2, i)
		if removed := gone(t, s, j, name); removed != (i%2 == 0) {
			t.Fatalf("%s removed %v after RemovePrefix(000000-) over %d files", name, removed, opt.Many)
		}
	}
	if err := s.RemoveJob(context.Background(), j); err != nil {
		t.Fatal(err)
	}
	for i := range opt.Many {
		if name := fmt.Sprintf("%06d-a1-output-Basic-%06d.ndjson", i%2, i); !gone(t, s, j, name) {
			t.Fatalf("%s left after RemoveJob", name)
		}
	}
}

// testAbort: an aborted write leaves no file (and replaces none).
func testAbort(t *testing.T, s kiln.Sink, opt Options) {
	j := job(t)
	w, err := s.Create(context.Background(), j, "000001-a1-output-Basic-001.ndjson", kiln.WriteOptions{PartSize: opt.PartSize})
	if err != nil {
		t.Fatal(err)
	}
	a, ok := w.(interface{ Abort() error })
	if !ok {
		w.Close()
		t.Skip("this sink's writers cannot abort")
	}
	w.Write(data(1 << 20))
	if err := a.Abort(); err != nil {
		t.Fatal(err)
	}
	if !gone(t, s, j, "000001-a1-output-Basic-001.ndjson") {
		t.Error("an aborted file can be read")
	}
	if err := s.RemoveJob(context.Background(), j); err != nil {
		t.Fatal(err)
	}
}

// testURLs: a sink that serves files itself gives a URL that downloads the
// file, anew on every call; once the job is removed the file is gone there.
func testURLs(t *testing.T, s kiln.Sink, opt Options) {
	us, ok := s.(kiln.URLSink)
	if !ok {
		t.Skip("Kiln serves this sink's files")
	}
	j := job(t)
	put(t, s, j, "000001-a1-output-Patient-001.ndjson", []byte("served\n"), opt)
	for range 2 {
		u, err := us.URL(context.Background(), j, "000001-a1-output-Patient-001.ndjson")
		if err != nil {
			t.Fatal(err)
		}
		res, err := http.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != 200 || string(b) != "served\n" {
			t.Fatalf("GET %s: %d %q", u, res.StatusCode, b)
		}
	}
	if err := s.RemoveJob(context.Background(), j); err != nil {
		t.Fatal(err)
	}
	u, err := us.URL(context.Background(), j, "000001-a1-output-Patient-001.ndjson")
	if err == nil {
		res, err := http.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode == 200 {
			t.Fatal("a removed job's file still downloads")
		}
	}
}

// testLocated: a LocatedSink opened At its own Location is the same place;
// At another location of its kind is another place (a job's files there are
// not seen, nor removed, through the first); a location of another kind is
// refused.
func testLocated(t *testing.T, s kiln.Sink, opt Options) {
	ls, ok := s.(kiln.LocatedSink)
	if !ok {
		t.Skip("not a LocatedSink")
	}
	j := job(t)
	same, err := ls.At(ls.Location())
	if err != nil {
		t.Fatal(err)
	}
	put(t, same, j, "a.ndjson", data(100), opt)
	if got := mustGet(t, s, j, "a.ndjson"); !bytes.Equal(got, data(100)) {
		t.Fatal("written At(Location()), not read back from the sink itself")
	}
	if l, ok := same.(kiln.LocatedSink); !ok || l.Location() != ls.Location() {
		t.Fatalf("At(%s) is at %v", ls.Location(), same)
	}
	sub := strings.TrimSuffix(ls.Location(), "/") + "/elsewhere"
	other, err := ls.At(sub)
	if err != nil {
		t.Fatal(err)
	}
	if l, ok := other.(kiln.LocatedSink); !ok || l.Location() != sub {
		t.Fatalf("At(%s) reports another location", sub)
	}
	if !gone(t, other, j, "a.ndjson") {
		t.Fatal("a file of the first location is seen At another")
	}
	put(t, other, j, "b.ndjson", data(50), opt)
	if !gone(t, s, j, "b.ndjson") {
		t.Fatal("a file written At another location is seen through the first")
	}
	if err := s.RemoveJob(context.Background(), j); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, other, j, "b.ndjson"); !bytes.Equal(got, data(50)) {
		t.Fatal("removing the job at one location removed its files at another")
	}
	other.RemoveJob(context.Background(), j)
	if _, err := ls.At("nosuch://x/y"); err == nil {
		t.Fatal("a location of another kind was accepted")
	}
}
