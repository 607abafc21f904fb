package k8s_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/k8s"
	"github.com/kiln-fhir/kiln/launchertest"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/sqlite"
)

var cfg = k8s.Config{
	Namespace: "fhir", Image: "registry.example/kiln:1.0", ServiceAccount: "kiln-worker",
	Env: []corev1.EnvVar{{Name: "KILN_STORE", Value: "postgres"}}, EnvFromSecrets: []string{"kiln-secrets"},
	BackoffLimit: 1, ActiveDeadline: 6 * time.Hour,
}

func TestJobSpecDefaults(t *testing.T) {
	l := k8s.New(fake.NewClientset(), cfg)
	j := &kiln.Job{ID: "0f8c7c2e-8c9b-4d7e-9a8e-1f0e6a1c2b3d", Launches: 1}
	spec, err := l.JobSpec(j)
	if err != nil {
		t.Fatal(err)
	}
	if spec.Name != "kiln-export-0f8c7c2e-8c9b-4d7e-9a8e-1f0e6a1c2b3d-1" || spec.Namespace != "fhir" {
		t.Errorf("name %s/%s", spec.Namespace, spec.Name)
	}
	s := spec.Spec
	if *s.BackoffLimit != 1 || *s.ActiveDeadlineSeconds != 6*3600 || *s.TTLSecondsAfterFinished != 60 || *s.Parallelism != 1 {
		t.Errorf("spec: backoff %d deadline %d ttl %d parallelism %d", *s.BackoffLimit, *s.ActiveDeadlineSeconds, *s.TTLSecondsAfterFinished, *s.Parallelism)
	}
	p := s.Template.Spec
	if p.RestartPolicy != corev1.RestartPolicyNever || p.ServiceAccountName != "kiln-worker" {
		t.Errorf("pod: %s %s", p.RestartPolicy, p.ServiceAccountName)
	}
	c := p.Containers[0]
	if c.Image != "registry.example/kiln:1.0" || len(c.Args) != 3 || c.Args[0] != "worker" || c.Args[2] != j.ID {
		t.Errorf("container: %s %v", c.Image, c.Args)
	}
	if c.Resources.Requests.Memory().String() != "2G" || c.Resources.Limits.Memory().String() != "8G" {
		t.Errorf("memory %s / %s", c.Resources.Requests.Memory(), c.Resources.Limits.Memory())
	}
	if _, ok := c.Resources.Requests[corev1.ResourceCPU]; ok {
		t.Error("a CPU request appeared (Helix's ram → CPU defect)")
	}
	if len(c.EnvFrom) != 1 || c.EnvFrom[0].SecretRef.Name != "kiln-secrets" || c.Env[0].Name != "KILN_STORE" {
		t.Errorf("env %v from %v", c.Env, c.EnvFrom)
	}
	if spec.Labels[k8s.LabelJob] != j.ID || spec.Labels[k8s.LabelLaunch] != "1" || p.Containers == nil {
		t.Errorf("labels %v", spec.Labels)
	}
}

// TestJobSpecWorkersPerJob: --workers-per-job N is the Job's parallelism with
// completions unset (a work queue: the Job succeeds once one pod has
// succeeded and all have ended), so N pods share the export's units.
func TestJobSpecWorkersPerJob(t *testing.T) {
	c := cfg
	c.WorkersPerJob = 3
	spec, err := k8s.New(fake.NewClientset(), c).JobSpec(&kiln.Job{ID: "0f8c7c2e-8c9b-4d7e-9a8e-1f0e6a1c2b3d", Launches: 1})
	if err != nil {
		t.Fatal(err)
	}
	if *spec.Spec.Parallelism != 3 || spec.Spec.Completions != nil {
		t.Errorf("parallelism %d, completions %v", *spec.Spec.Parallelism, spec.Spec.Completions)
	}
}

func TestJobSpecPodParameters(t *testing.T) {
	l := k8s.New(fake.NewClientset(), cfg)
	ttl := 30
	cases := []struct {
		req          kiln.ExportRequest
		request, lim string
		ttl          int32
		loglevel     string
	}{
		{kiln.ExportRequest{JobHints: kiln.JobHints{RequestsMemory: "2Gi", LimitsMemory: "4G"}}, "2Gi", "4G", 60, ""},
		{kiln.ExportRequest{JobHints: kiln.JobHints{RAM: "3"}}, "3G", "8G", 60, ""},
		{kiln.ExportRequest{JobHints: kiln.JobHints{RAM: "1", RequestsMemory: "512M"}}, "512M", "8G", 60, ""},
		{kiln.ExportRequest{JobHints: kiln.JobHints{RequestsMemory: "16G"}}, "16G", "16G", 60, ""},
		{kiln.ExportRequest{JobHints: kiln.JobHints{TTLSecondsAfterFinished: &ttl, LogLevel: "debug"}}, "2G", "8G", 30, "debug"},
	}
	for i, c := range cases {
		spec, err := l.JobSpec(&kiln.Job{ID: "j", Launches: 1, Request: c.req})
		if err != nil {
			t.Fatal(err)
		}
		ct := spec.Spec.Template.Spec.Containers[0]
		want := resource.MustParse(c.request)
		if ct.Resources.Requests.Memory().Cmp(want) != 0 || ct.Resources.Limits.Memory().Cmp(resource.MustParse(c.lim)) != 0 {
			t.Errorf("case %d: memory %s / %s, want %s / %s", i, ct.Resources.Requests.Memory(), ct.Resources.Limits.Memory(), c.request, c.lim)
		}
		if *spec.Spec.TTLSecondsAfterFinished != c.ttl {
			t.Errorf("case %d: ttl %d", i, *spec.Spec.TTLSecondsAfterFinished)
		}
		var lvl string
		for _, e := range ct.Env {
			if e.Name == "KILN_LOG_LEVEL" {
				lvl = e.Value
			}
		}
		if lvl != c.loglevel {
			t.Errorf("case %d: KILN_LOG_LEVEL %q", i, lvl)
		}
	}
}

type rig struct {
	db     *sqlite.DB
	svc    *export.Service
	client *fake.Clientset
}

// newRig runs an API-server-side export service that launches Jobs on a fake cluster.
func newRig(t *testing.T, maxLaunches int) *rig {
	dir := t.TempDir()
	db, err := sqlite.Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	p, _ := fhir.Parse([]byte(`{"resourceType":"Patient","id":"p1"}`))
	db.Write(context.Background(), []kiln.Write{fhir.Prepare(p, "p1", fhir.Options{})})
	sink, _ := localfs.New(filepath.Join(dir, "exports"))
	client := fake.NewClientset()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	svc := export.New(db, db, sink, export.Config{Logger: log, Launcher: k8s.New(client, cfg), MaxLaunches: maxLaunches, RelaunchEvery: 50 * time.Millisecond,
		// Only launch events finish exports here: the coordinator's
		// catch-all pass would otherwise hide a broken watch path.
		RecoverEvery: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); svc.Run(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return &rig{db: db, svc: svc, client: client}
}

func (r *rig) start(t *testing.T) *kiln.Job {
	t.Helper()
	req := export.NewRequest(kiln.LevelSystem)
	req.PatientReferenceBatchSize, req.FetchResourceBatchSize = 10, 10
	j, err := r.svc.Start(context.Background(), req, "t")
	if err != nil {
		t.Fatal(err)
	}
	return j
}

func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if f() {
			return
		}
	}
	t.Fatalf("never: %s", what)
}

func (r *rig) kjob(name string) *batchv1.Job {
	j, err := r.client.BatchV1().Jobs("fhir").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	return j
}

func (r *rig) setCondition(t *testing.T, name string, typ batchv1.JobConditionType, reason string) {
	t.Helper()
	j := r.kjob(name)
	j.Status.Conditions = append(j.Status.Conditions, batchv1.JobCondition{Type: typ, Status: corev1.ConditionTrue, Reason: reason, Message: "test"})
	if _, err := r.client.BatchV1().Jobs("fhir").UpdateStatus(context.Background(), j, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (r *rig) state(id string) kiln.JobState {
	j, err := r.svc.Job(context.Background(), id)
	if err != nil {
		return ""
	}
	return j.State
}

// workUnits plays the worker pod: it runs every unit to completion without
// finishing the job (the server's watch does that).
func (r *rig) workUnits(t *testing.T) {
	t.Helper()
	for {
		u, err := r.db.ClaimUnit(context.Background(), time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if u == nil {
			return
		}
		if ok, err := r.db.FinishUnit(context.Background(), u, nil); !ok || err != nil {
			t.Fatalf("finish unit: %v %v", ok, err)
		}
	}
}

func TestQuotaRefusalKeepsTheExportAccepted(t *testing.T) {
	r := newRig(t, 3)
	var refuse atomic.Bool
	var refused atomic.Int32
	refuse.Store(true)
	r.client.PrependReactor("create", "jobs", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if refuse.Load() {
			refused.Add(1)
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "batch", Resource: "jobs"}, "x", errors.New("exceeded quota: compute-resources"))
		}
		return false, nil, nil
	})
	j := r.start(t)
	// More refusals than the 3 launches allowed: none may count as one.
	eventually(t, "five quota refusals", func() bool { return refused.Load() >= 5 })
	if s := r.state(j.ID); s != kiln.JobAccepted {
		t.Fatalf("after quota refusals: %s, want accepted", s)
	}
	refuse.Store(false)
	eventually(t, "the Job is created once the quota allows", func() bool { return r.kjob(k8s.JobName(j.ID, 1)) != nil })
}

// TestForbiddenLaunchFailsTheExportSaySo (issue 16): a Role that lacks a
// verb fails the export at once with a message naming the Role, instead of
// spending every launch attempt or hanging.
func TestForbiddenLaunchFailsTheExportSaySo(t *testing.T) {
	r := newRig(t, 3)
	var tries atomic.Int32
	r.client.PrependReactor("create", "jobs", func(a k8stesting.Action) (bool, runtime.Object, error) {
		tries.Add(1)
		return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "batch", Resource: "jobs"}, "kiln-export-x-1",
			errors.New(`User "system:serviceaccount:fhir:kiln" cannot create resource "jobs" in API group "batch" in the namespace "fhir"`))
	})
	j := r.start(t)
	eventually(t, "export failed", func() bool { return r.state(j.ID) == kiln.JobFailed })
	got, _ := r.svc.Job(context.Background(), j.ID)
	if !strings.Contains(got.Error, "its Role needs create") || !strings.Contains(got.Error, "cannot create resource") || tries.Load() != 1 {
		t.Fatalf("after %d tries: %q", tries.Load(), got.Error)
	}
}

func TestFailedJobFailsTheExport(t *testing.T) {
	r := newRig(t, 1)
	j := r.start(t)
	name := k8s.JobName(j.ID, 1)
	eventually(t, "Job created", func() bool { return r.kjob(name) != nil })
	r.setCondition(t, name, batchv1.JobFailed, "BackoffLimitExceeded")
	eventually(t, "export failed", func() bool { return r.state(j.ID) == kiln.JobFailed })
	got, _ := r.svc.Job(context.Background(), j.ID)
	if got.Error == "" {
		t.Fatal("no message for the failure")
	}
}

func TestFailedOrDeletedJobIsRelaunched(t *testing.T) {
	r := newRig(t, 3)
	j := r.start(t)
	first := k8s.JobName(j.ID, 1)
	eventually(t, "Job created", func() bool { return r.kjob(first) != nil })
	r.setCondition(t, first, batchv1.JobFailed, "DeadlineExceeded")
	second := k8s.JobName(j.ID, 2)
	eventually(t, "relaunched after a failure", func() bool { return r.kjob(second) != nil })
	if err := r.client.BatchV1().Jobs("fhir").Delete(context.Background(), second, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "relaunched after a deletion", func() bool { return r.kjob(k8s.JobName(j.ID, 3)) != nil })
	if s := r.state(j.ID); s == kiln.JobFailed {
		t.Fatal("export failed while launches remained")
	}
}

func TestWatchCompletesTheExport(t *testing.T) {
	r := newRig(t, 3)
	j := r.start(t)
	name := k8s.JobName(j.ID, 1)
	eventually(t, "Job created", func() bool { return r.kjob(name) != nil })
	r.workUnits(t)
	if s := r.state(j.ID); s == kiln.JobCompleted {
		t.Fatal("completed before the watch saw the Job finish")
	}
	r.setCondition(t, name, batchv1.JobComplete, "")
	eventually(t, "export completed", func() bool { return r.state(j.ID) == kiln.JobCompleted })
	// Cancelling deletes the Job.
	if err := r.svc.Cancel(context.Background(), j.ID); err != nil {
		t.Fatal(err)
	}
	if r.kjob(name) != nil {
		t.Fatal("Job left after cancel")
	}
}

// TestContract runs the launcher contract on client-go's fake clientset,
// playing the Job controller's part: a Job's end is its Complete or Failed
// condition. (The real control plane is issue 16's rig, not built yet.)
func TestContract(t *testing.T) {
	launchertest.Run(t, func(t *testing.T) launchertest.Harness {
		client := fake.NewClientset()
		jobs := client.BatchV1().Jobs(cfg.Namespace)
		// The watch is registered with the fake's tracker here, then
		// reported: an event sent before that would be lost.
		watching := make(chan struct{})
		var once sync.Once
		client.PrependWatchReactor("jobs", func(a k8stesting.Action) (bool, watch.Interface, error) {
			w, err := client.Tracker().Watch(a.GetResource(), a.GetNamespace())
			once.Do(func() { close(watching) })
			return true, w, err
		})
		// latest is the job's Job of the highest launch, if any.
		latest := func(t *testing.T, id string) *batchv1.Job {
			list, err := jobs.List(context.Background(), metav1.ListOptions{LabelSelector: k8s.LabelJob + "=" + id})
			if err != nil {
				t.Fatal(err)
			}
			var top *batchv1.Job
			for i := range list.Items {
				j := &list.Items[i]
				if n, _ := strconv.Atoi(j.Labels[k8s.LabelLaunch]); top == nil || n > mustAtoi(top.Labels[k8s.LabelLaunch]) {
					top = j
				}
			}
			return top
		}
		ended := func(j *batchv1.Job) bool {
			for _, c := range j.Status.Conditions {
				if (c.Type == batchv1.JobComplete || c.Type == batchv1.JobFailed) && c.Status == corev1.ConditionTrue {
					return true
				}
			}
			return false
		}
		return launchertest.Harness{
			Launcher: k8s.New(client, cfg),
			End: func(t *testing.T, id string, ok bool) {
				j := latest(t, id)
				c := batchv1.JobCondition{Type: batchv1.JobComplete, Status: corev1.ConditionTrue}
				if !ok {
					c = batchv1.JobCondition{Type: batchv1.JobFailed, Status: corev1.ConditionTrue, Reason: "BackoffLimitExceeded", Message: "pods failed"}
				}
				j.Status.Conditions = append(j.Status.Conditions, c)
				if _, err := jobs.UpdateStatus(context.Background(), j, metav1.UpdateOptions{}); err != nil {
					t.Fatal(err)
				}
			},
			Running: func(t *testing.T, id string) bool {
				j := latest(t, id)
				return j != nil && !ended(j)
			},
			Watching: func(t *testing.T) {
				select {
				case <-watching:
				case <-time.After(time.Minute):
					t.Fatal("the launcher never watched")
				}
			},
		}
	})
}

func mustAtoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}
