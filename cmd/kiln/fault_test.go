package main

import (
	"bufio"
	"bytes"
	"context"
	crand "crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/kiln-fhir/kiln/postgres"
	"github.com/kiln-fhir/kiln/synth"
)

// TestKillNineDuringExport kills kiln serve with SIGKILL at random moments of
// an export, again and again, restarting it on the same data folder each
// time; the export then completes with exactly the store's resources, none
// twice and none torn.
func TestKillNineDuringExport(t *testing.T) {
	if testing.Short() {
		t.Skip("fault test")
	}
	bin := buildKiln(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	gen := seedStore(t, bin, dir, 150, 9, []string{"--data", data})
	k := &kilnProc{t: t, bin: bin, args: []string{"--data", data, "--export-unit-size", "1500", "--log-level", "error"}}
	k.start()
	defer k.stop()
	locs := []string{
		k.kickOff("/$export?fetchResourceBatchSize=50"),
		k.kickOff("/Patient/$export?patientReferenceBatchSize=5&fetchResourceBatchSize=50"),
	}
	// The test reads the store beside the server (WAL: readers do not block it).
	db, err := sql.Open("sqlite", "file:"+filepath.Join(data, "kiln.db")+"?_pragma=busy_timeout(10000)&_pragma=query_only(1)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	running := func() int {
		var n int
		db.QueryRow(`SELECT count(*) FROM units WHERE state='running'`).Scan(&n)
		return n
	}
	rng := rand.New(rand.NewPCG(1, 2))
	kills := 0
	for range 6 {
		// Each kill hits the server in the middle of a unit.
		for deadline := time.Now().Add(time.Minute); running() == 0; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no unit running before kill %d", kills+1)
			}
		}
		time.Sleep(time.Duration(rng.IntN(100)) * time.Millisecond) // somewhere inside it
		k.cmd.Process.Signal(syscall.SIGKILL)
		k.cmd.Wait()
		kills++
		k.start()
	}
	want := countLines(t, gen)
	for _, loc := range locs {
		code, m := awaitExport(t, loc, 2*time.Minute)
		if code != 200 {
			t.Fatalf("%s after %d kills: status %d", loc, kills, code)
		}

		checkExport(t, loc, m, want)
	}
	// The units the kills interrupted were redone (a kill hit each while it ran).
	var redone int
	db.QueryRow(`SELECT count(*) FROM units WHERE attempts > 1`).Scan(&redone)
	if redone == 0 {
		t.Errorf("no unit was redone after %d kills", kills)
	}
}

// kilnProc is a kiln serve subprocess on a loopback port.
type kilnProc struct {
	t    *testing.T
	bin  string
	args []string
	env  []string
	addr string
	cmd  *exec.Cmd
	// basePath is the --base-path among args ("" for the default /4_0_0).
	basePath string
	// log, when set, receives the server's log besides stderr.
	log *syncBuffer
}

// syncBuffer is a bytes.Buffer safe for a process's output and a test's reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start starts (or restarts, on the same port) kiln serve and waits until it is ready.
func (k *kilnProc) start() {
	t := k.t
	t.Helper()
	if k.addr == "" {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		k.addr = ln.Addr().String()
		ln.Close()
	}
	k.cmd = exec.Command(k.bin, append([]string{"serve", "--addr", k.addr}, k.args...)...)
	k.cmd.Env = append(os.Environ(), k.env...)
	k.cmd.Stderr = os.Stderr
	if k.log != nil {
		k.cmd.Stderr = io.MultiWriter(os.Stderr, k.log)
	}
	if err := k.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if res, err := http.Get("http://" + k.addr + "/readyz"); err == nil {
			res.Body.Close()
			if res.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("kiln serve did not start")
		}
	}
}

func (k *kilnProc) stop() {
	if k.cmd != nil && k.cmd.Process != nil {
		k.cmd.Process.Kill()
		k.cmd.Wait()
	}
}

func (k *kilnProc) base() string {
	if k.basePath == "" {
		return "http://" + k.addr + "/4_0_0"
	}
	return "http://" + k.addr + strings.TrimSuffix(k.basePath, "/")
}

// kickOff starts an export at base+path and returns its status URL.
func (k *kilnProc) kickOff(path string) string {
	k.t.Helper()
	res, err := http.Get(k.base() + path)
	if err != nil {
		k.t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != 202 {
		k.t.Fatalf("kick-off %s: %d", path, res.StatusCode)
	}
	return res.Header.Get("Content-Location")
}

type manifest struct {
	RequiresAccessToken bool
	Output              []struct {
		Type, URL string
		Count     int
	}
	Error []struct{ Type, URL string }
	// Outcome is the body of a final status other than 200.
	Outcome string
}

// awaitExport polls a status URL until it stops answering 202 and returns the
// final status with the manifest (200) or the OperationOutcome's text (other).
func awaitExport(t *testing.T, loc string, limit time.Duration) (int, *manifest) {
	t.Helper()
	for deadline := time.Now().Add(limit); ; time.Sleep(50 * time.Millisecond) {
		res, err := http.Get(loc)
		if err != nil {
			t.Fatal(err)
		}
		if res.StatusCode == 429 || res.StatusCode == 503 {
			// Polled too fast, or the store is away for a moment: wait.
			res.Body.Close()
			time.Sleep(500 * time.Millisecond)
			continue
		}
		if res.StatusCode != 202 {
			var m manifest
			if res.StatusCode == 200 {
				if err := json.NewDecoder(res.Body).Decode(&m); err != nil {
					t.Fatalf("manifest: %v", err)
				}
			} else {
				b, _ := io.ReadAll(res.Body)
				m.Outcome = string(b)
			}
			res.Body.Close()
			return res.StatusCode, &m
		}
		res.Body.Close()
		if time.Now().After(deadline) {
			t.Fatalf("%s still running after %s", loc, limit)
		}
	}
}

// checkExport reads every file of a manifest: each line is a whole resource
// of the file's type, no id appears twice and there are want in all.
func checkExport(t *testing.T, loc string, m *manifest, want int) {
	t.Helper()
	ids := map[string][]string{}
	for _, o := range m.Output {
		res, err := http.Get(o.URL)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(res.Body)
		sc.Buffer(make([]byte, 1<<20), 16<<20)
		for sc.Scan() {
			var r struct{ ResourceType, ID string }
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil || r.ResourceType != o.Type {
				t.Fatalf("torn or misplaced line in %s: %v %.80s", o.Type, err, sc.Text())
			}
			ids[o.Type] = append(ids[o.Type], r.ID)
		}
		res.Body.Close()
	}
	total := 0
	for typ, list := range ids {
		if n := len(slices.Compact(slices.Sorted(slices.Values(list)))); n != len(list) {
			t.Errorf("%s: %s has %d lines for %d distinct ids", loc, typ, len(list), n)
		}
		total += len(list)
	}
	if total != want {
		t.Errorf("%s: %d resources exported, want %d", loc, total, want)
	}
}

// seedStore generates patients into dir/gen and loads them with kiln import
// and storeArgs (--data …, or --store postgres …); it returns the generated folder.
func seedStore(t *testing.T, bin, dir string, patients int, seed uint64, storeArgs []string, env ...string) string {
	t.Helper()
	gen := filepath.Join(dir, "gen")
	if _, err := synth.Generate(context.Background(), gen, synth.Options{Patients: patients, Seed: seed}); err != nil {
		t.Fatal(err)
	}
	imp := exec.Command(bin, append(append([]string{"import", "--quiet"}, storeArgs...), gen)...)
	imp.Env = append(os.Environ(), env...)
	if out, err := imp.CombinedOutput(); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	return gen
}

func countLines(t *testing.T, dir string) int {
	files, _ := filepath.Glob(filepath.Join(dir, "*.ndjson"))
	n := 0
	for _, f := range files {
		out, err := exec.Command("wc", "-l", f).Output()
		if err != nil {
			t.Fatal(err)
		}
		var c int
		fmt.Sscan(string(out), &c)
		n += c
	}
	return n
}

// TestPostgresRestartDuringExport restarts the PostgreSQL server (the command
// in KILN_PG_RESTART, which scripts/test sets) twice while exports run on it:
// both exports complete with exactly the store's resources. Then it stops the
// server (KILN_PG_STOP): /readyz and REST reads answer 503 with Retry-After;
// and starts it again (KILN_PG_START): both answer 200 again.
func TestPostgresRestartDuringExport(t *testing.T) {
	env := requireEnv(t, "KILN_POSTGRES_URL", "KILN_PG_RESTART", "KILN_PG_STOP", "KILN_PG_START")
	pgURL, restart, stop, start := env[0], env[1], env[2], env[3]
	if testing.Short() {
		t.Skip("fault test")
	}
	ctx := context.Background()
	bin := buildKiln(t)
	dir := t.TempDir()
	b := make([]byte, 5)
	crand.Read(b)
	schema := "restart_" + hex.EncodeToString(b)
	defer postgres.DropSchema(ctx, pgURL, schema)
	common := []string{"--store", "postgres", "--postgres-schema", schema, "--data", filepath.Join(dir, "data")}
	pgEnv := []string{"KILN_POSTGRES_URL=" + pgURL}
	gen := seedStore(t, bin, dir, 150, 11, common, pgEnv...)
	k := &kilnProc{t: t, bin: bin, env: pgEnv, args: append([]string{"--export-unit-size", "1000", "--unit-lease", "3s", "--log-level", "warn"}, common...)}
	k.start()
	defer k.stop()
	locs := []string{
		k.kickOff("/$export?fetchResourceBatchSize=50"),
		k.kickOff("/Patient/$export?patientReferenceBatchSize=5&fetchResourceBatchSize=50"),
	}
	// Each restart hits the server in the middle of a unit.
	units := pgx.Identifier{schema, "units"}.Sanitize()
	running := func() int {
		conn, err := pgx.Connect(ctx, pgURL)
		if err != nil {
			return 0 // the server is coming back
		}
		defer conn.Close(ctx)
		var n int
		conn.QueryRow(ctx, `SELECT count(*) FROM `+units+` WHERE state='running'`).Scan(&n)
		return n
	}
	for i := range 2 {
		for deadline := time.Now().Add(time.Minute); running() == 0; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no unit running before restart %d", i+1)
			}
		}
		if out, err := exec.Command("sh", "-c", restart).CombinedOutput(); err != nil {
			t.Fatalf("restart %d of PostgreSQL: %v\n%s", i+1, err, out)
		}
	}
	want := countLines(t, gen)
	for _, loc := range locs {
		code, m := awaitExport(t, loc, 3*time.Minute)
		if code != 200 {
			t.Fatalf("%s after PostgreSQL restarts: status %d", loc, code)
		}
		checkExport(t, loc, m, want)
	}
	// The units the restarts interrupted were handed back and redone.
	conn, err := pgx.Connect(ctx, pgURL)
	if err != nil {
		t.Fatal(err)
	}
	var redone int
	conn.QueryRow(ctx, `SELECT count(*) FROM `+units+` WHERE attempts > 1`).Scan(&redone)
	conn.Close(ctx)
	if redone == 0 {
		t.Error("no unit was redone after two PostgreSQL restarts mid-unit")
	}
	get := func(url string) *http.Response {
		t.Helper()
		res, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res
	}
	if res := get(k.base() + "/Patient?_count=1"); res.StatusCode != 200 {
		t.Fatalf("REST read after restarts: %d", res.StatusCode)
	}
	pgctl := func(what, cmd string) {
		t.Helper()
		if out, err := exec.Command("sh", "-c", cmd).CombinedOutput(); err != nil {
			t.Fatalf("%s PostgreSQL: %v\n%s", what, err, out)
		}
	}
	pgctl("stop", stop)
	stopped := true
	defer func() {
		if stopped {
			exec.Command("sh", "-c", start).Run()
		}
	}()
	if res := get("http://" + k.addr + "/readyz"); res.StatusCode != 503 {
		t.Errorf("/readyz with PostgreSQL stopped: %d", res.StatusCode)
	}
	if res := get(k.base() + "/Patient?_count=1"); res.StatusCode != 503 || res.Header.Get("Retry-After") == "" {
		t.Errorf("REST read with PostgreSQL stopped: %d, Retry-After %q", res.StatusCode, res.Header.Get("Retry-After"))
	}
	pgctl("start", start)
	stopped = false
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if get("http://"+k.addr+"/readyz").StatusCode == 200 && get(k.base()+"/Patient?_count=1").StatusCode == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("not ready 15 s after PostgreSQL started again")
		}
	}
}

// TestDiskFullDuringExport runs an export on a data folder that is a small
// tmpfs: the disk fills up part way, the job fails with an OperationOutcome
// that says so, no manifest is ever shown, the export's files are removed
// (the space is free again), and the server goes on: a small export then
// completes on the same disk. Needs root for the mount.
func TestDiskFullDuringExport(t *testing.T) {
	if testing.Short() {
		t.Skip("fault test")
	}
	if os.Geteuid() != 0 {
		if os.Getenv("KILN_REQUIRE_INTEGRATION") == "1" {
			t.Fatal("the disk-full test mounts a tmpfs and needs root, and KILN_REQUIRE_INTEGRATION=1")
		}
		t.Skip("needs root to mount a tmpfs")
	}
	bin := buildKiln(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	gen := seedStore(t, bin, dir, 60, 13, []string{"--data", src})
	// Room for the store and about a third of the export.
	size := dirBytes(t, src) + dirBytes(t, gen)/3
	data := filepath.Join(dir, "data")
	os.Mkdir(data, 0o700)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d", size), "tmpfs", data).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v\n%s", err, out)
	}
	defer exec.Command("umount", "-l", data).Run()
	if out, err := exec.Command("cp", "-a", src+"/.", data).CombinedOutput(); err != nil {
		t.Fatalf("copy store: %v\n%s", err, out)
	}
	k := &kilnProc{t: t, bin: bin, args: []string{"--data", data, "--export-unit-size", "800", "--log-level", "error"}, log: &syncBuffer{}}
	k.start()
	defer k.stop()
	before := freeBytes(t, data)
	loc := k.kickOff("/$export")
	code, m := awaitExport(t, loc, 2*time.Minute)
	if code != 500 || !strings.Contains(m.Outcome, "OperationOutcome") || !strings.Contains(m.Outcome, "no space left on device") {
		t.Fatalf("export on a full disk: status %d, %s", code, m.Outcome)
	}
	// The fault hit a unit while it wrote its part to the sink (not the
	// store, not the planner): the engine logs which unit failed and how.
	unitWrite := regexp.MustCompile(`msg="export failed" job=` + regexp.QuoteMeta(filepath.Base(loc)) + ` unit=\d+ kind=\w+ .*write export part .*no space left on device`)
	if !unitWrite.MatchString(k.log.String()) {
		t.Fatalf("no unit failed writing its part on the full disk; the server said:\n%s", k.log.String())
	}
	// Still failed, still no manifest, on a later poll.
	if code, _ := awaitExport(t, loc, time.Second); code != 500 {
		t.Fatalf("failed export later answers %d", code)
	}
	// The job is marked failed first (so that no unit finishes it), then its
	// running units stop and its files go: wait for that, not for a guess.
	jobFolder := filepath.Join(data, "exports", filepath.Base(loc))
	for deadline := time.Now().Add(45 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		_, err := os.Stat(jobFolder)
		if os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the failed export's folder is still there 45 s after the failure: %v", err)
		}
	}
	// The store's log may keep a little; the export's megabytes are back.
	after := freeBytes(t, data)
	if after < before-before/10 {
		t.Errorf("free space %d bytes after the failed export, %d before it", after, before)
	}
	t.Logf("tmpfs of %.1f MB: %.1f MB free before the export, %.1f MB after it failed: %s", float64(size)/1e6, float64(before)/1e6, float64(after)/1e6, m.Outcome)
	small := k.kickOff("/$export?_type=Patient")
	code, m = awaitExport(t, small, time.Minute)
	if code != 200 {
		t.Fatalf("export after the disk filled: status %d %s", code, m.Outcome)
	}
	checkExport(t, small, m, 60)
}

func dirBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		if err == nil {
			n += info.Size()
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func freeBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

// TestSigtermDrainAndSlowClients: a client that sends its headers slowly is
// cut off after --read-header-timeout (the slowloris guard) while others are
// served; SIGTERM during an export makes kiln serve exit 0 within
// --shutdown-grace, handing its running units back, and after a restart the
// export completes with every resource exactly once.
func TestSigtermDrainAndSlowClients(t *testing.T) {
	if testing.Short() {
		t.Skip("fault test")
	}
	bin := buildKiln(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	gen := seedStore(t, bin, dir, 150, 21, []string{"--data", data})
	k := &kilnProc{t: t, bin: bin, args: []string{"--data", data, "--export-unit-size", "2000", "--read-header-timeout", "1s", "--shutdown-grace", "5s", "--log-level", "error"}}
	k.start()
	defer k.stop()

	slow, err := net.Dial("tcp", k.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	start := time.Now()
	fmt.Fprint(slow, "GET /4_0_0/metadata HTTP/1.1\r\nHost: x\r\n")
	go func() {
		// One header byte every 200 ms, never the blank line that ends them.
		for range 50 {
			time.Sleep(200 * time.Millisecond)
			if _, err := slow.Write([]byte("X")); err != nil {
				return
			}
		}
	}()
	if res, err := http.Get(k.base() + "/metadata"); err != nil || res.StatusCode != 200 {
		t.Fatalf("a normal client beside the slow one: %v %v", res, err)
	}
	// The server, not our own read deadline, must end the connection: a
	// deadline error means it kept the slow client for 8 s (8 × the timeout).
	slow.SetReadDeadline(time.Now().Add(8 * time.Second))
	if _, err := io.Copy(io.Discard, slow); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("a client sending headers slowly was kept past our 8 s deadline (read-header-timeout 1s, kept %s)", time.Since(start))
		}
	}

	// Small units and fetches, so that SIGTERM finds it running.
	loc := k.kickOff("/Patient/$export?patientReferenceBatchSize=2&fetchResourceBatchSize=10")
	for {
		res, err := http.Get(loc)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != 202 {
			t.Fatalf("the export should still be running when SIGTERM comes: %d", res.StatusCode)
		}
		if p := res.Header.Get("X-Progress"); strings.HasPrefix(p, "in-progress") {
			t.Logf("SIGTERM at X-Progress %q", p)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	k.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- k.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("kiln serve after SIGTERM: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("kiln serve did not stop within its shutdown grace after SIGTERM")
	}
	k.start()
	code, m := awaitExport(t, loc, 2*time.Minute)
	if code != 200 {
		t.Fatalf("export after SIGTERM and restart: %d %s", code, m.Outcome)
	}
	checkExport(t, loc, m, countLines(t, gen))
}

// TestLeaderKilledMidExport (issue 16): two API servers on one PostgreSQL,
// both running export units; the one that coordinates is killed (SIGKILL)
// in the middle of the export. The other takes coordination over when the
// leadership lease runs out, hands the dead server's units back, and the
// export completes with every resource once.
func TestLeaderKilledMidExport(t *testing.T) {
	pgURL := requireEnv(t, "KILN_POSTGRES_URL")[0]
	if testing.Short() {
		t.Skip("fault test")
	}
	ctx := context.Background()
	bin := buildKiln(t)
	dir := t.TempDir()
	b := make([]byte, 5)
	crand.Read(b)
	schema := "leader_" + hex.EncodeToString(b)
	defer postgres.DropSchema(ctx, pgURL, schema)
	common := []string{"--store", "postgres", "--postgres-schema", schema, "--data", filepath.Join(dir, "data")}
	pgEnv := []string{"KILN_POSTGRES_URL=" + pgURL}
	gen := seedStore(t, bin, dir, 150, 17, common, pgEnv...)
	args := append([]string{"--export-unit-size", "400", "--export-workers", "1", "--unit-lease", "2s", "--leader-lease", "2s", "--log-level", "warn"}, common...)
	conn, err := pgx.Connect(ctx, pgURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	leader := func() string {
		var h string
		conn.QueryRow(ctx, `SELECT holder FROM `+pgx.Identifier{schema, "leaders"}.Sanitize()+` WHERE expires > (extract(epoch from clock_timestamp()) * 1000)::bigint`).Scan(&h)
		return h
	}
	a := &kilnProc{t: t, bin: bin, env: pgEnv, args: args}
	a.start()
	defer a.stop()
	for deadline := time.Now().Add(20 * time.Second); leader() == ""; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the first server never led")
		}
	}
	first := leader()
	bsrv := &kilnProc{t: t, bin: bin, env: pgEnv, args: args}
	bsrv.start()
	defer bsrv.stop()
	loc := bsrv.kickOff("/$export?fetchResourceBatchSize=50")
	id := loc[strings.LastIndex(loc, "/")+1:]
	units := pgx.Identifier{schema, "units"}.Sanitize()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		var running, done int
		conn.QueryRow(ctx, `SELECT count(*) FILTER (WHERE state='running'), count(*) FILTER (WHERE state='done') FROM `+units+` WHERE job=$1`, id).Scan(&running, &done)
		if running == 2 && done >= 1 {
			break // both servers are in the middle of a unit
		}
		if time.Now().After(deadline) {
			t.Fatalf("both servers never ran units (running %d, done %d)", running, done)
		}
	}
	a.cmd.Process.Kill()
	a.cmd.Wait()
	code, m := awaitExport(t, loc, 3*time.Minute)
	if code != 200 {
		t.Fatalf("export after the leader died: %d %s", code, m.Outcome)
	}
	checkExport(t, loc, m, countLines(t, gen))
	var redone int
	conn.QueryRow(ctx, `SELECT count(*) FROM `+units+` WHERE job=$1 AND attempts > 1`, id).Scan(&redone)
	if now := leader(); redone == 0 || now == "" || now == first {
		t.Errorf("after the leader died: %d units redone, leader %q (was %q)", redone, now, first)
	}
}
