package httpapi

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestJSONShape(t *testing.T) {
	for _, c := range []struct {
		in            string
		values, depth int
	}{
		{`{}`, 2, 1},
		{`{"a":1,"b":[1,2,3]}`, 8, 2},
		{`{"a":"{[,:]}\"{"}`, 3, 1}, // structure inside strings does not count
		{`[[[[]]]]`, 5, 4},
		{`"x"`, 1, 0},
	} {
		if v, d := jsonShape([]byte(c.in)); v != c.values || d != c.depth {
			t.Errorf("%s: %d values, depth %d; want %d, %d", c.in, v, d, c.values, c.depth)
		}
	}
}

// TestDecodeBudgetIsReturned: every request gives its share of the decode
// budget back when it ends, also when its handler fails; a request whose
// share is not free waits, and gives up with its context.
func TestDecodeBudgetIsReturned(t *testing.T) {
	s := New(nil, nil, Config{MaxBodyValues: 100, DecodeBudget: 100}, nil)
	body := `{"resourceType":"Patient","id":"a","name":[{"family":"x"}]}`
	for range 3 {
		req := httptest.NewRequest("PUT", "/4_0_0/Patient/a", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/fhir+json")
		func() {
			defer func() { recover() }() // no store here: the handler may fail after reading
			s.ServeHTTP(httptest.NewRecorder(), req)
		}()
	}
	if !s.decoding.TryAcquire(100) {
		t.Fatal("the decode budget was not given back")
	}
	// With the budget taken, a body waits for its share and gives up with its context.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req := httptest.NewRequestWithContext(ctx, "PUT", "/x", strings.NewReader(body))
	req = req.WithContext(context.WithValue(ctx, bodyLeaseKey{}, &bodyLease{sem: s.decoding, maxValues: 100, maxDepth: 10}))
	if _, err := readBody(req); err == nil {
		t.Fatal("a body read while the budget is spent did not wait")
	}
	s.decoding.Release(100)
}

// TestDecodeBudgetReturnsWhenTheAnswerStarts: a request gives its share
// back as its response starts, so a client that never reads its answer
// holds none of the budget.
func TestDecodeBudgetReturnsWhenTheAnswerStarts(t *testing.T) {
	s := New(nil, nil, Config{MaxBodyValues: 100, DecodeBudget: 100}, nil)
	answered, finish := make(chan struct{}), make(chan struct{})
	s.mux.HandleFunc("PUT /slow", func(w http.ResponseWriter, r *http.Request) {
		if _, err := readBody(r); err != nil {
			t.Error(err)
		}
		w.WriteHeader(http.StatusOK)
		close(answered)
		<-finish // as if writing to a client that does not read
	})
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("PUT", "/slow", strings.NewReader(`{"a":[1,2,3]}`)))
	}()
	<-answered
	if !s.decoding.TryAcquire(100) {
		t.Error("the budget is still held while the answer is written")
	} else {
		s.decoding.Release(100)
	}
	close(finish)
	<-done
}
