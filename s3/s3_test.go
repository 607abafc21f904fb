package s3_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/ingest"
	"github.com/kiln-fhir/kiln/internal/heappeak"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/s3"
	"github.com/kiln-fhir/kiln/sinktest"
	"github.com/kiln-fhir/kiln/sqlite"
)

// endpoint is the S3 server the tests use: KILN_S3_ENDPOINT (scripts/test
// starts versitygw and sets it, with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
func endpoint(t *testing.T) string {
	e := os.Getenv("KILN_S3_ENDPOINT")
	if e == "" {
		if os.Getenv("KILN_REQUIRE_INTEGRATION") == "1" {
			t.Fatal("KILN_S3_ENDPOINT is not set, and KILN_REQUIRE_INTEGRATION=1")
		}
		t.Skip("KILN_S3_ENDPOINT not set: no S3 server to test against (scripts/test starts one)")
	}
	return e
}

// newBucket creates a bucket of its own for a test.
func newBucket(t *testing.T) string {
	t.Helper()
	b := make([]byte, 6)
	rand.Read(b)
	name := "kiln-test-" + hex.EncodeToString(b)
	sink, err := s3.New(context.Background(), s3.Config{Bucket: name, Endpoint: endpoint(t), PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sink.Client().CreateBucket(context.Background(), &awss3.CreateBucketInput{Bucket: &name}); err != nil {
		t.Fatalf("create bucket: %v", err)
	}
	return name
}

func newSink(t *testing.T, cfg s3.Config) *s3.Sink {
	t.Helper()
	cfg.Endpoint, cfg.PathStyle = endpoint(t), true
	if cfg.Bucket == "" {
		cfg.Bucket = newBucket(t)
	}
	sink, err := s3.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return sink
}

// TestContract runs the sink contract on S3, without and with a key prefix.
func TestContract(t *testing.T) {
	for _, prefix := range []string{"", "tenants/a/exports"} {
		t.Run("prefix="+prefix, func(t *testing.T) {
			var bucket string
			sinktest.Run(t, func(t *testing.T) kiln.Sink {
				if bucket == "" {
					bucket = newBucket(t)
				}
				return newSink(t, s3.Config{Bucket: bucket, Prefix: prefix})
			}, sinktest.Options{PartSize: 5 << 20})
		})
	}
}

// TestKeyPrefix: with a prefix, every object of the sink is under it.
func TestKeyPrefix(t *testing.T) {
	ctx := context.Background()
	bucket := newBucket(t)
	sink := newSink(t, s3.Config{Bucket: bucket, Prefix: "/tenants/a/"})
	w, err := sink.Create(ctx, "job1", "000001-a1-output-Patient-001.ndjson", kiln.WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "x\n")
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := sink.Client().ListObjectsV2(ctx, &awss3.ListObjectsV2Input{Bucket: &bucket})
	if err != nil {
		t.Fatal(err)
	}
	if len(out.Contents) != 1 || !strings.HasPrefix(aws.ToString(out.Contents[0].Key), "tenants/a/job1/") {
		var keys []string
		for _, o := range out.Contents {
			keys = append(keys, aws.ToString(o.Key))
		}
		t.Fatalf("objects %v, want one under tenants/a/job1/", keys)
	}
}

func lines(n int, width int) []byte {
	var b bytes.Buffer
	for i := range n {
		fmt.Fprintf(&b, `{"resourceType":"Basic","id":"b%d","text":"%s"}`+"\n", i, strings.Repeat("z", width))
	}
	return b.Bytes()
}

func writeLines(t *testing.T, w io.Writer, data []byte) {
	t.Helper()
	for _, l := range bytes.SplitAfter(data, []byte("\n")) {
		if len(l) == 0 {
			continue
		}
		if _, err := w.Write(l); err != nil {
			t.Fatal(err)
		}
	}
}

func TestMultipartObjectIsTheStream(t *testing.T) {
	ctx := context.Background()
	sink := newSink(t, s3.Config{})
	data := lines(12_000, 1000) // ~12 MB: three parts of 5 MiB
	w, err := sink.Create(ctx, "job1", "000000-output-Basic-001.ndjson", kiln.WriteOptions{PartSize: 5 << 20})
	if err != nil {
		t.Fatal(err)
	}
	writeLines(t, w, data)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := sink.Client().GetObject(ctx, &awss3.GetObjectInput{Bucket: aws.String(bucketOf(sink)), Key: aws.String(sink.Key("job1", "000000-output-Basic-001.ndjson"))})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(out.Body)
	out.Body.Close()
	if !bytes.Equal(got, data) {
		t.Fatalf("object differs from the stream: %d vs %d bytes", len(got), len(data))
	}
	if ct := aws.ToString(out.ContentType); ct != "application/fhir+ndjson" {
		t.Errorf("Content-Type %q", ct)
	}
	if etag := aws.ToString(out.ETag); !strings.Contains(etag, "-") {
		t.Errorf("ETag %s is not a multipart one", etag)
	}
	// The presigned URL serves it without credentials.
	u, err := sink.URL(ctx, "job1", "000000-output-Basic-001.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	res, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || !bytes.Equal(body, data) {
		t.Fatalf("presigned GET: %d, %d bytes", res.StatusCode, len(body))
	}
	s3style := newSink(t, s3.Config{Bucket: bucketOf(sink), URLStyle: "s3"})
	if u, _ := s3style.URL(ctx, "job1", "x.ndjson"); u != "s3://"+bucketOf(sink)+"/job1/x.ndjson" {
		t.Errorf("s3 URL style: %s", u)
	}
}

func bucketOf(s *s3.Sink) string {
	// The bucket is the key's first path segment when the sink has no prefix.
	u, _ := s.URL(context.Background(), "j", "n")
	if strings.HasPrefix(u, "s3://") {
		return strings.SplitN(strings.TrimPrefix(u, "s3://"), "/", 2)[0]
	}
	return strings.Split(strings.SplitN(u, "://", 2)[1], "/")[1]
}

// failingClient fails every UploadPart request after the first n.
type failingClient struct {
	n     int32
	calls atomic.Int32
}

func (f *failingClient) Do(r *http.Request) (*http.Response, error) {
	if r.Method == http.MethodPut && r.URL.Query().Get("partNumber") != "" && f.calls.Add(1) > f.n {
		return nil, errors.New("injected: connection reset")
	}
	return http.DefaultClient.Do(r)
}

func TestFailedUploadLeavesNoMultipartUpload(t *testing.T) {
	ctx := context.Background()
	good := newSink(t, s3.Config{})
	bad := newSink(t, s3.Config{Bucket: bucketOf(good), HTTPClient: &failingClient{n: 1}})
	w, _ := bad.Create(ctx, "job2", "000000-output-Basic-001.ndjson", kiln.WriteOptions{PartSize: 5 << 20})
	var werr error
	for _, l := range bytes.SplitAfter(lines(20_000, 1000), []byte("\n")) {
		if _, werr = w.Write(l); werr != nil {
			break
		}
	}
	cerr := w.Close()
	if werr == nil && cerr == nil {
		t.Fatal("upload with failing parts succeeded")
	}
	ups, err := good.Uploads(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(ups) != 0 {
		t.Fatalf("%d multipart uploads left behind", len(ups))
	}
}

type exportRig struct {
	db  *sqlite.DB
	svc *export.Service
}

func newExportRig(t *testing.T, db *sqlite.DB, sink kiln.Sink) *exportRig {
	svc := export.New(db, db, sink, export.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), UnitSize: 50_000})
	return &exportRig{db: db, svc: svc}
}

// run exports with this rig's workers alone: rigs share one store, so only
// one may run workers at a time.
func (r *exportRig) run(t *testing.T, partSize int64) *kiln.Job {
	t.Helper()
	ctx := context.Background()
	runCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); r.svc.Run(runCtx) }()
	defer func() { cancel(); wg.Wait() }()
	req := export.NewRequest(kiln.LevelSystem)
	req.UploadPartSize = partSize
	job, err := r.svc.Start(ctx, req, "t")
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		j, err := r.svc.Job(ctx, job.ID)
		if err != nil {
			t.Fatal(err)
		}
		if j.Finished() {
			return j
		}
	}
	t.Fatal("export did not finish")
	return nil
}

// content concatenates each type's files in manifest order.
func content(t *testing.T, r *exportRig, j *kiln.Job, viaURL bool) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for i := range j.Files {
		f := &j.Files[i]
		var body []byte
		if viaURL {
			u, ok, err := r.svc.FileURL(context.Background(), j, f)
			if err != nil || !ok {
				t.Fatalf("file URL: %v %v", ok, err)
			}
			res, err := http.Get(u)
			if err != nil {
				t.Fatal(err)
			}
			body, _ = io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != 200 {
				t.Fatalf("GET %s: %d", u, res.StatusCode)
			}
		} else {
			rc, _, err := r.svc.OpenFile(context.Background(), j, f.Name)
			if err != nil {
				t.Fatal(err)
			}
			body, _ = io.ReadAll(rc)
			rc.Close()
		}
		out[f.Kind+"/"+f.Type] = append(out[f.Kind+"/"+f.Type], body...)
	}
	return out
}

// TestExport615ToS3: the 615-patient set exported to S3 in 5 MiB parts is,
// through presigned URLs, byte-identical to the local-sink export; a cancel
// deletes the objects; a failing upload fails the job and leaves no uploads.
func TestExport615ToS3(t *testing.T) {
	endpoint(t)
	dir := t.TempDir()
	db, err := sqlite.Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := ingest.Load(context.Background(), db, []string{filepath.Join("..", "..", "shared", "data", "synthea-r4-615")}, ingest.LoadOptions{NewID: uuid.NewString}); err != nil {
		t.Fatal(err)
	}
	local, _ := localfs.New(filepath.Join(dir, "exports"))
	sink := newSink(t, s3.Config{})
	lr := newExportRig(t, db, local)
	sr := newExportRig(t, db, sink)
	lj := lr.run(t, 5<<20)
	sj := sr.run(t, 5<<20)
	if lj.State != kiln.JobCompleted || sj.State != kiln.JobCompleted {
		t.Fatalf("states %s %s: %s", lj.State, sj.State, sj.Error)
	}
	lc, sc := content(t, lr, lj, false), content(t, sr, sj, true)
	if len(lc) != len(sc) || len(lc) == 0 {
		t.Fatalf("%d types local, %d on S3", len(lc), len(sc))
	}
	var total int
	for k, b := range lc {
		if !bytes.Equal(b, sc[k]) {
			t.Errorf("%s: S3 export differs from the local one (%d vs %d bytes)", k, len(sc[k]), len(b))
		}
		total += len(b)
	}
	if total < 200<<20 {
		t.Fatalf("only %d bytes exported", total)
	}
	ups, _ := sink.Uploads(context.Background(), "")
	if len(ups) != 0 {
		t.Fatalf("%d multipart uploads left after a good export", len(ups))
	}
	if err := sr.svc.Cancel(context.Background(), sj.ID); err != nil {
		t.Fatal(err)
	}
	list, err := sink.Client().ListObjectsV2(context.Background(), &awss3.ListObjectsV2Input{Bucket: aws.String(bucketOf(sink)), Prefix: aws.String(sj.ID + "/")})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Contents) != 0 {
		t.Fatalf("%d objects left after cancel", len(list.Contents))
	}

	// A job whose uploads fail: failed, with an OperationOutcome message, nothing left.
	bad := newSink(t, s3.Config{Bucket: bucketOf(sink), HTTPClient: &failingClient{n: 2}})
	br := newExportRig(t, db, bad)
	fj := br.run(t, 5<<20)
	if fj.State != kiln.JobFailed || !strings.Contains(fj.Error, "export failed") {
		t.Fatalf("failing uploads: state %s, error %q", fj.State, fj.Error)
	}
	ups, _ = sink.Uploads(context.Background(), "")
	if len(ups) != 0 {
		t.Fatalf("%d multipart uploads left after a failed export", len(ups))
	}
	list, _ = sink.Client().ListObjectsV2(context.Background(), &awss3.ListObjectsV2Input{Bucket: aws.String(bucketOf(sink)), Prefix: aws.String(fj.ID + "/")})
	if len(list.Contents) != 0 {
		t.Fatalf("%d objects left after a failed export", len(list.Contents))
	}
}

// TestUploadMemoryBounded streams a large object (KILN_S3_BIG_MB, default 256)
// in 5 MiB parts: the heap holds a few parts, whatever the object's size.
func TestUploadMemoryBounded(t *testing.T) {
	ctx := context.Background()
	sink := newSink(t, s3.Config{})
	mb := 256
	if v := os.Getenv("KILN_S3_BIG_MB"); v != "" {
		fmt.Sscan(v, &mb)
	}
	line := []byte(`{"resourceType":"Basic","id":"x","text":"` + strings.Repeat("y", 950) + `"}` + "\n")
	total := int64(mb) << 20
	watch := heappeak.Start()
	start := time.Now()
	w, _ := sink.Create(ctx, "big", "000000-output-Basic-001.ndjson", kiln.WriteOptions{PartSize: 5 << 20})
	for written := int64(0); written < total; written += int64(len(line)) {
		if _, err := w.Write(line); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	growth, _ := watch.Stop()
	t.Logf("%d MB in 5 MiB parts: %.1fs, peak heap growth %.1f MB, process peak RSS %s", mb, time.Since(start).Seconds(), float64(growth)/1e6, vmHWM())
	if growth > 48<<20 {
		t.Fatalf("heap grew %d MB for a %d MB object: not bounded by the part size", growth>>20, mb)
	}
	head, err := sink.Client().HeadObject(ctx, &awss3.HeadObjectInput{Bucket: aws.String(bucketOf(sink)), Key: aws.String(sink.Key("big", "000000-output-Basic-001.ndjson"))})
	if err != nil || aws.ToInt64(head.ContentLength) < total {
		t.Fatalf("object: %v %v", err, head)
	}
	sink.RemoveJob(ctx, "big")
}

func vmHWM() string {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM:") {
			return strings.TrimSpace(strings.TrimPrefix(l, "VmHWM:"))
		}
	}
	return "?"
}
