package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/kiln-fhir/kiln/postgres"
	"github.com/kiln-fhir/kiln/s3"
	"github.com/kiln-fhir/kiln/synth"
)

func requireEnv(t *testing.T, names ...string) []string {
	var out []string
	for _, n := range names {
		v := os.Getenv(n)
		if v == "" {
			if os.Getenv("KILN_REQUIRE_INTEGRATION") == "1" {
				t.Fatalf("%s is not set, and KILN_REQUIRE_INTEGRATION=1", n)
			}
			t.Skipf("%s not set", n)
		}
		out = append(out, v)
	}
	return out
}

func buildKiln(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "kiln")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

// TestLaunchedWorkerEndToEnd: kiln serve with the launcher path (kiln worker
// processes per export instead of a Kubernetes Job's pods; two of them, as
// --workers-per-job 2 gives), PostgreSQL as the shared store and S3 as the
// sink; the export completes through the HTTP API, its presigned files hold
// every resource, and both workers ran some of its units.
func TestLaunchedWorkerEndToEnd(t *testing.T) {
	env := requireEnv(t, "KILN_POSTGRES_URL", "KILN_S3_ENDPOINT")
	pgURL, s3URL := env[0], env[1]
	ctx := context.Background()
	bin := buildKiln(t)
	dir := t.TempDir()
	b := make([]byte, 5)
	rand.Read(b)
	schema, bucket := "launch_"+hex.EncodeToString(b), "kiln-launch-"+hex.EncodeToString(b)
	defer postgres.DropSchema(ctx, pgURL, schema)
	sink, err := s3.New(ctx, s3.Config{Bucket: bucket, Endpoint: s3URL, PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sink.Client().CreateBucket(ctx, &awss3.CreateBucketInput{Bucket: &bucket}); err != nil {
		t.Fatal(err)
	}
	gen := filepath.Join(dir, "gen")
	st, err := synth.Generate(ctx, gen, synth.Options{Patients: 40, Seed: 5})
	if err != nil {
		t.Fatal(err)
	}
	common := []string{"--store", "postgres", "--postgres-schema", schema, "--data", filepath.Join(dir, "data")}
	cmdEnv := append(os.Environ(), "KILN_POSTGRES_URL="+pgURL)
	imp := exec.Command(bin, append([]string{"import", "--quiet"}, append(common, gen)...)...)
	imp.Env = cmdEnv
	if out, err := imp.CombinedOutput(); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	srv := exec.Command(bin, append([]string{"serve", "--addr", addr, "--launcher", "process", "--workers-per-job", "2", "--export-unit-size", "200",
		"--sink", "s3", "--s3-bucket", bucket, "--s3-endpoint", s3URL, "--s3-path-style", "--log-level", "warn"}, common...)...)
	srv.Env = cmdEnv
	logs, _ := srv.StderrPipe()
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Signal(os.Interrupt); srv.Wait() }()
	// Each worker says, as it exits, how many units it ran.
	ran := make(chan int, 4)
	unitsRan := regexp.MustCompile(`this worker ran (\d+) of its units`)
	go func() {
		sc := bufio.NewScanner(logs)
		for sc.Scan() {
			fmt.Fprintln(os.Stderr, "serve:", sc.Text())
			if m := unitsRan.FindStringSubmatch(sc.Text()); m != nil {
				n, _ := strconv.Atoi(m[1])
				ran <- n
			}
		}
	}()
	base := "http://" + addr + "/4_0_0"
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if res, err := http.Get("http://" + addr + "/readyz"); err == nil {
			res.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("kiln serve did not start")
		}
	}
	res, err := http.Get(base + "/$export")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 202 {
		t.Fatalf("kick-off: %d", res.StatusCode)
	}
	loc := res.Header.Get("Content-Location")
	code, m := awaitExport(t, loc, time.Minute)
	if code != 200 {
		t.Fatalf("status %d %s", code, m.Outcome)
	}
	n := 0
	for _, o := range m.Output {
		if !strings.Contains(o.URL, "X-Amz-Signature") {
			t.Fatalf("not a presigned URL: %s", o.URL)
		}
		res, err := http.Get(o.URL)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(res.Body)
		sc.Buffer(make([]byte, 1<<20), 16<<20)
		lines := 0
		for sc.Scan() {
			lines++
		}
		res.Body.Close()
		if lines != o.Count {
			t.Fatalf("%s: %d lines, count %d", o.Type, lines, o.Count)
		}
		n += lines
	}
	if n != st.Total() || m.RequiresAccessToken {
		t.Fatalf("exported %d of %d resources; requiresAccessToken %v", n, st.Total(), m.RequiresAccessToken)
	}
	for i := range 2 {
		select {
		case n := <-ran:
			if n == 0 {
				t.Errorf("worker %d of 2 ran no unit", i+1)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("%d of 2 workers reported back", i)
		}
	}
}
