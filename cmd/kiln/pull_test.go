package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
)

// TestPullShowsServerErrorsAndNeedsAllowPartial: an export whose error file
// reports a failed output prints the server's issues and exits non-zero,
// committing nothing; --resume --allow-partial commits it, and --verify
// then passes.
func TestPullShowsServerErrorsAndNeedsAllowPartial(t *testing.T) {
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/$export":
			w.Header().Set("Content-Location", srv.URL+"/status")
			w.WriteHeader(http.StatusAccepted)
		case "/status":
			fmt.Fprintf(w, `{"transactionTime":"2026-01-01T00:00:00Z","request":"x","output":[{"type":"Patient","url":"%[1]s/p","count":1}],
				"error":[{"type":"OperationOutcome","url":"%[1]s/e"}]}`, srv.URL)
		case "/p":
			fmt.Fprintln(w, `{"resourceType":"Patient","id":"a"}`)
		case "/e":
			fmt.Fprintln(w, `{"resourceType":"OperationOutcome","issue":[{"severity":"fatal","code":"exception","diagnostics":"MedicationRequest shard lost"}]}`)
		}
	}))
	defer srv.Close()
	dir := filepath.Join(t.TempDir(), "pull")
	code, out, errOut := runCLI(t, "pull", "--server", srv.URL, "--out", dir)
	if code == 0 || !strings.Contains(errOut, "fatal exception: MedicationRequest shard lost") || !strings.Contains(errOut, "--allow-partial") {
		t.Fatalf("a failed output: exit %d\n%s\n%s", code, out, errOut)
	}
	if code, _, _ := runCLI(t, "pull", "--verify", dir); code == 0 {
		t.Fatal("--verify passes a folder with nothing committed")
	}
	code, out, errOut = runCLI(t, "pull", "--resume", dir, "--allow-partial")
	if code != 0 || !strings.Contains(out, "1 failed outputs") {
		t.Fatalf("--allow-partial: exit %d\n%s\n%s", code, out, errOut)
	}
	if code, out, errOut := runCLI(t, "pull", "--verify", dir); code != 0 || !strings.Contains(out, "2 files, 1 resources") {
		t.Fatalf("--verify: exit %d\n%s\n%s", code, out, errOut)
	}
}

// TestResumeHintRepeatsTheAuthFlags: the hint printed on an interrupted
// pull names every authentication flag the resume needs (a token as TOKEN).
func TestResumeHintRepeatsTheAuthFlags(t *testing.T) {
	got := authHint("", "", "svc", "key.pem", "k1", "https://auth/token", "system/*.read")
	for _, want := range []string{"--client-id svc", "--private-key key.pem", "--key-id k1", "--token-url https://auth/token", "--scope 'system/*.read'"} {
		if !strings.Contains(got, want) {
			t.Errorf("hint %q lacks %q", got, want)
		}
	}
	if got := authHint("secret", "", "", "", "", "", ""); got != " --token TOKEN" {
		t.Errorf("token hint %q", got)
	}
}
