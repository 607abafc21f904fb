package main

// The Kubernetes test rig (issue 16): a real control plane — etcd,
// kube-apiserver and kube-controller-manager (Job, TTL-after-finished and
// garbage-collector controllers), built from k8s.io/kubernetes by
// scripts/k8s-control-plane — and a small node agent of our own standing in
// for a kubelet, since no container runtime runs here: it binds each pod to
// its node, runs the pod's container (Kiln's image) as a local kiln process
// with the pod's environment, and reports the pod's phase through the API.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/jackc/pgx/v5"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/kiln-fhir/kiln/k8s"
	"github.com/kiln-fhir/kiln/postgres"
	"github.com/kiln-fhir/kiln/s3"
)

type k8sRig struct {
	t          *testing.T
	dir        string
	server     string // https://127.0.0.1:port
	adminToken string
	admin      *kubernetes.Clientset
	node       *nodeAgent
}

// freePort returns a loopback port nobody listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startK8sRig starts the control plane and the node agent, or skips when
// the binaries are not configured (KILN_K8S_BIN: the folder
// scripts/k8s-control-plane prints; etcd from PATH or KILN_ETCD).
func startK8sRig(t *testing.T, kiln string) *k8sRig {
	t.Helper()
	bin := requireEnv(t, "KILN_K8S_BIN")[0]
	etcd := os.Getenv("KILN_ETCD")
	if etcd == "" {
		etcd, _ = exec.LookPath("etcd")
	}
	if etcd == "" {
		if os.Getenv("KILN_REQUIRE_INTEGRATION") == "1" {
			t.Fatal("etcd not found (KILN_ETCD or PATH), and KILN_REQUIRE_INTEGRATION=1")
		}
		t.Skip("etcd not found")
	}
	dir := t.TempDir()
	r := &k8sRig{t: t, dir: dir}
	start := func(name string, args ...string) {
		t.Helper()
		cmd := exec.Command(args[0], args[1:]...)
		logf, _ := os.Create(filepath.Join(dir, name+".log"))
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		t.Cleanup(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				<-done
			}
			logf.Close()
			if t.Failed() {
				b, _ := os.ReadFile(filepath.Join(dir, name+".log"))
				if len(b) > 4000 {
					b = b[len(b)-4000:]
				}
				t.Logf("%s log (end):\n%s", name, b)
			}
		})
	}
	ec, ep, api := freePort(t), freePort(t), freePort(t)
	start("etcd", etcd, "--name", "rig", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", fmt.Sprintf("http://127.0.0.1:%d", ec), "--advertise-client-urls", fmt.Sprintf("http://127.0.0.1:%d", ec),
		"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", ep), "--initial-advertise-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", ep),
		"--initial-cluster", fmt.Sprintf("rig=http://127.0.0.1:%d", ep))

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	os.WriteFile(filepath.Join(dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600)
	os.WriteFile(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o600)
	tb := make([]byte, 16)
	rand.Read(tb)
	r.adminToken = fmt.Sprintf("%x", tb)
	os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(r.adminToken+",rig-admin,rig-admin,system:masters\n"), 0o600)
	start("kube-apiserver", filepath.Join(bin, "kube-apiserver"),
		"--etcd-servers", fmt.Sprintf("http://127.0.0.1:%d", ec),
		"--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", fmt.Sprint(api),
		"--cert-dir", filepath.Join(dir, "certs"), "--token-auth-file", filepath.Join(dir, "tokens.csv"),
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", filepath.Join(dir, "sa.pub"), "--service-account-signing-key-file", filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/24", "--enable-priority-and-fairness=false")
	r.server = fmt.Sprintf("https://127.0.0.1:%d", api)
	r.waitReady("/readyz", 2*time.Minute)
	r.writeKubeconfig("admin.kubeconfig", r.adminToken)
	start("kube-controller-manager", filepath.Join(bin, "kube-controller-manager"),
		"--kubeconfig", filepath.Join(dir, "admin.kubeconfig"), "--leader-elect=false", "--secure-port", "0",
		"--controllers", "job-controller,ttl-after-finished-controller,garbage-collector-controller,serviceaccount-controller",
		"--use-service-account-credentials=false")
	r.admin = r.clientset(r.adminToken)
	r.node = startNodeAgent(t, r.admin, kiln)
	return r
}

func (r *k8sRig) restConfig(token string) *rest.Config {
	return &rest.Config{Host: r.server, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{Insecure: true}, QPS: 50, Burst: 100}
}

func (r *k8sRig) clientset(token string) *kubernetes.Clientset {
	c, err := kubernetes.NewForConfig(r.restConfig(token))
	if err != nil {
		r.t.Fatal(err)
	}
	return c
}

// writeKubeconfig writes a kubeconfig for the rig with a bearer token.
func (r *k8sRig) writeKubeconfig(name, token string) string {
	p := filepath.Join(r.dir, name)
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: rig
  cluster:
    server: %s
    insecure-skip-tls-verify: true
users:
- name: user
  user:
    token: %s
contexts:
- name: rig
  context:
    cluster: rig
    user: user
current-context: rig
`, r.server, token)
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		r.t.Fatal(err)
	}
	return p
}

func (r *k8sRig) waitReady(path string, limit time.Duration) {
	r.t.Helper()
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, Timeout: 5 * time.Second}
	for deadline := time.Now().Add(limit); ; time.Sleep(200 * time.Millisecond) {
		req, _ := http.NewRequest("GET", r.server+path, nil)
		req.Header.Set("Authorization", "Bearer "+r.adminToken)
		if res, err := client.Do(req); err == nil {
			res.Body.Close()
			if res.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("kube-apiserver not ready at %s within %s", path, limit)
		}
	}
}

// kubectl runs kubectl against the rig as admin.
func (r *k8sRig) kubectl(stdin []byte, args ...string) ([]byte, error) {
	cmd := exec.Command("kubectl", append([]string{"--kubeconfig", filepath.Join(r.dir, "admin.kubeconfig")}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	return cmd.CombinedOutput()
}

// nodeAgent stands in for a kubelet on one node.
type nodeAgent struct {
	t      *testing.T
	client *kubernetes.Clientset
	kiln   string
	node   string

	mu    sync.Mutex
	procs map[string]*exec.Cmd // pod namespace/name → its container's process
	seen  map[string]*corev1.Pod
	ran   int
}

func startNodeAgent(t *testing.T, client *kubernetes.Clientset, kiln string) *nodeAgent {
	a := &nodeAgent{t: t, client: client, kiln: kiln, node: "rig-node", procs: map[string]*exec.Cmd{}, seen: map[string]*corev1.Pod{}}
	ctx, cancel := context.WithCancel(context.Background())
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: a.node}}
	if _, err := client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	node, _ = client.CoreV1().Nodes().Get(ctx, a.node, metav1.GetOptions{})
	node.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now(), Reason: "KilnRigAgent"}}
	node.Status.Capacity = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Gi"), corev1.ResourceCPU: resource.MustParse("8"), corev1.ResourcePods: resource.MustParse("110")}
	node.Status.Allocatable = node.Status.Capacity
	client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
	done := make(chan struct{})
	go func() { defer close(done); a.run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		a.mu.Lock()
		for _, p := range a.procs {
			p.Process.Kill()
		}
		a.mu.Unlock()
	})
	return a
}

func (a *nodeAgent) run(ctx context.Context) {
	for ctx.Err() == nil {
		w, err := a.client.CoreV1().Pods("").Watch(ctx, metav1.ListOptions{})
		if err != nil {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		for ev := range w.ResultChan() {
			pod, ok := ev.Object.(*corev1.Pod)
			if !ok {
				continue
			}
			a.handle(ctx, ev.Type, pod)
		}
		w.Stop()
	}
}

func (a *nodeAgent) handle(ctx context.Context, typ watch.EventType, pod *corev1.Pod) {
	key := pod.Namespace + "/" + pod.Name
	pods := a.client.CoreV1().Pods(pod.Namespace)
	switch {
	case typ == watch.Deleted || pod.DeletionTimestamp != nil:
		a.mu.Lock()
		p := a.procs[key]
		delete(a.procs, key)
		a.mu.Unlock()
		if p != nil {
			p.Process.Kill()
		}
		if typ != watch.Deleted {
			zero := int64(0)
			pods.Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
		}
	case pod.Spec.NodeName == "":
		b := &corev1.Binding{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace}, Target: corev1.ObjectReference{Kind: "Node", Name: a.node}}
		if err := pods.Bind(ctx, b, metav1.CreateOptions{}); err != nil && !apierrors.IsConflict(err) {
			a.t.Logf("node agent: bind %s: %v", key, err)
		}
	case pod.Status.Phase == corev1.PodPending:
		a.mu.Lock()
		_, started := a.procs[key]
		a.mu.Unlock()
		if !started {
			a.startPod(ctx, pod)
		}
	}
}

// env is the container's environment as a kubelet would make it: envFrom
// first (Secrets and ConfigMaps), then env.
func (a *nodeAgent) env(ctx context.Context, pod *corev1.Pod, c corev1.Container) ([]string, error) {
	out := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.TempDir()}
	for _, ef := range c.EnvFrom {
		switch {
		case ef.SecretRef != nil:
			s, err := a.client.CoreV1().Secrets(pod.Namespace).Get(ctx, ef.SecretRef.Name, metav1.GetOptions{})
			if err != nil {
				return nil, err
			}
			for k, v := range s.Data {
				out = append(out, k+"="+string(v))
			}
		case ef.ConfigMapRef != nil:
			m, err := a.client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, ef.ConfigMapRef.Name, metav1.GetOptions{})
			if err != nil {
				return nil, err
			}
			for k, v := range m.Data {
				out = append(out, k+"="+v)
			}
		}
	}
	for _, e := range c.Env {
		out = append(out, e.Name+"="+e.Value)
	}
	return out, nil
}

// startPod runs the pod's one container (Kiln's image: the kiln binary with
// the container's args) and reports Running, then how it ended.
func (a *nodeAgent) startPod(ctx context.Context, pod *corev1.Pod) {
	key := pod.Namespace + "/" + pod.Name
	pods := a.client.CoreV1().Pods(pod.Namespace)
	c := pod.Spec.Containers[0]
	env, err := a.env(ctx, pod, c)
	if err != nil {
		a.t.Logf("node agent: env of %s: %v", key, err)
		return
	}
	if lim, ok := c.Resources.Limits[corev1.ResourceMemory]; ok && lim.Value() < 16<<20 {
		// No Kiln worker starts in under 16 MiB: a kubelet would see it
		// OOM-killed at once. Report that, as the kubelet would.
		a.mu.Lock()
		a.seen[key] = pod.DeepCopy()
		a.mu.Unlock()
		now := metav1.Now()
		for range 20 {
			cur, err := pods.Get(ctx, pod.Name, metav1.GetOptions{})
			if err != nil {
				return
			}
			cur.Status.Phase, cur.Status.StartTime = corev1.PodFailed, &now
			cur.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: c.Name, Image: c.Image, ImageID: c.Image,
				State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 137, Reason: "OOMKilled", StartedAt: now, FinishedAt: now}}}}
			if _, err := pods.UpdateStatus(ctx, cur, metav1.UpdateOptions{}); err == nil || !apierrors.IsConflict(err) {
				return
			}
		}
		return
	}
	cmd := exec.Command(a.kiln, c.Args...)
	cmd.Env = env
	logf, _ := os.Create(filepath.Join(os.TempDir(), "kiln-rig-"+pod.Name+".log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		a.t.Logf("node agent: start %s: %v", key, err)
		return
	}
	a.mu.Lock()
	a.procs[key] = cmd
	a.seen[key] = pod.DeepCopy()
	a.ran++
	a.mu.Unlock()
	now := metav1.Now()
	setStatus := func(phase corev1.PodPhase, state corev1.ContainerState) {
		for range 20 {
			cur, err := pods.Get(ctx, pod.Name, metav1.GetOptions{})
			if err != nil {
				return
			}
			cur.Status.Phase = phase
			cur.Status.StartTime = &now
			cur.Status.HostIP, cur.Status.PodIP = "127.0.0.1", "127.0.0.1"
			ready := corev1.ConditionFalse
			if phase == corev1.PodRunning {
				ready = corev1.ConditionTrue
			}
			cur.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: ready, LastTransitionTime: metav1.Now()}}
			cur.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: c.Name, Image: c.Image, ImageID: c.Image, State: state, Ready: phase == corev1.PodRunning, Started: ptr(phase == corev1.PodRunning)}}
			if _, err := pods.UpdateStatus(ctx, cur, metav1.UpdateOptions{}); err == nil || !apierrors.IsConflict(err) {
				return
			}
		}
	}
	setStatus(corev1.PodRunning, corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}})
	go func() {
		err := cmd.Wait()
		logf.Close()
		code := 0
		if err != nil {
			code = 1
			if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() > 0 {
				code = ee.ExitCode()
			} else if ok {
				code = 137 // killed
			}
		}
		a.mu.Lock()
		_, live := a.procs[key]
		delete(a.procs, key)
		a.mu.Unlock()
		if !live {
			return // deleted: nothing to report
		}
		phase := corev1.PodSucceeded
		if code != 0 {
			phase = corev1.PodFailed
		}
		setStatus(phase, corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: int32(code), Reason: map[bool]string{true: "Completed", false: "Error"}[code == 0], StartedAt: now, FinishedAt: metav1.Now()}})
	}()
}

// kill sends SIGKILL to the process of one running pod of the namespace,
// as when a node's worker dies; it returns the pod's name.
func (a *nodeAgent) kill(namespace string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	for key, p := range a.procs {
		if strings.HasPrefix(key, namespace+"/") {
			p.Process.Kill()
			return key
		}
	}
	return ""
}

// running counts the live processes of pods of the namespace.
func (a *nodeAgent) running(namespace string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for key := range a.procs {
		if strings.HasPrefix(key, namespace+"/") {
			n++
		}
	}
	return n
}

func ptr[T any](v T) *T { return &v }

// TestKubernetesRig (issue 16): kiln serve --launcher kubernetes on a real
// control plane, talking to it as the deploy/kubernetes ServiceAccount (a
// TokenRequest token, never as admin), PostgreSQL and S3: the 615-patient
// set is exported by a Job of three pods that really run kiln worker; one
// worker process is killed mid-export and the failed Job is relaunched, and
// the files still hold every resource once; the pod parameters of the
// kick-off are in the pod spec the API server stored; ttlSecondsAfterFinished
// removes the finished Jobs; and with a Role that lacks create the next
// export fails at once with a message that says so.
func TestKubernetesRig(t *testing.T) {
	env := requireEnv(t, "KILN_POSTGRES_URL", "KILN_S3_ENDPOINT")
	pgURL, s3URL := env[0], env[1]
	bin := buildKiln(t)
	r := startK8sRig(t, bin)
	ctx := context.Background()
	manifests := filepath.Join("..", "..", "deploy", "kubernetes")
	if out, err := r.kubectl(nil, "create", "namespace", "fhir"); err != nil {
		t.Fatalf("create namespace: %v\n%s", err, out)
	}
	// Every manifest passes the real API server's validation.
	if out, err := r.kubectl(nil, "apply", "--dry-run=server", "-n", "fhir", "-f", manifests); err != nil {
		t.Fatalf("kubectl apply --dry-run=server: %v\n%s", err, out)
	}
	for _, f := range []string{"serviceaccount.yaml", "role.yaml"} {
		if out, err := r.kubectl(nil, "apply", "-n", "fhir", "-f", filepath.Join(manifests, f)); err != nil {
			t.Fatalf("apply %s: %v\n%s", f, err, out)
		}
	}
	tr, err := r.admin.CoreV1().ServiceAccounts("fhir").CreateToken(ctx, "kiln",
		&authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: ptr(int64(3600))}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := r.writeKubeconfig("kiln.kubeconfig", tr.Status.Token)
	// The account sees what its Role grants and nothing more.
	if out, _ := r.kubectl(nil, "auth", "can-i", "list", "pods", "-n", "fhir", "--as", "system:serviceaccount:fhir:kiln"); strings.TrimSpace(string(out)) != "no" {
		t.Fatalf("the kiln account may list pods: %s", out)
	}

	b := make([]byte, 5)
	rand.Read(b)
	schema, bucket := "rig_"+fmt.Sprintf("%x", b), "kiln-rig-"+fmt.Sprintf("%x", b)
	defer postgres.DropSchema(ctx, pgURL, schema)
	sink, err := s3.New(ctx, s3.Config{Bucket: bucket, Endpoint: s3URL, PathStyle: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sink.Client().CreateBucket(ctx, &awss3.CreateBucketInput{Bucket: &bucket}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	common := []string{"--store", "postgres", "--postgres-schema", schema, "--data", filepath.Join(dir, "data")}
	imp := exec.Command(bin, append([]string{"import", "--quiet"}, append(common, dataDir615(t))...)...)
	imp.Env = append(os.Environ(), "KILN_POSTGRES_URL="+pgURL)
	if out, err := imp.CombinedOutput(); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	db, err := postgres.Open(ctx, pgURL, postgres.Options{Schema: schema})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	counts, _ := db.Counts(ctx)
	want := 0
	for _, n := range counts {
		want += int(n)
	}
	// What the pods get: the store and the sink, from a Secret.
	podEnv := map[string]string{
		"KILN_STORE": "postgres", "KILN_POSTGRES_URL": pgURL, "KILN_POSTGRES_SCHEMA": schema,
		"KILN_SINK": "s3", "KILN_S3_BUCKET": bucket, "KILN_S3_ENDPOINT": s3URL, "KILN_S3_PATH_STYLE": "true",
		"AWS_ACCESS_KEY_ID": os.Getenv("AWS_ACCESS_KEY_ID"), "AWS_SECRET_ACCESS_KEY": os.Getenv("AWS_SECRET_ACCESS_KEY"), "AWS_REGION": "us-east-1",
		"KILN_DATA": filepath.Join(dir, "worker-data"), "KILN_EXPORT_WORKERS": "1", "KILN_UNIT_LEASE": "2s",
	}
	if _, err := r.admin.CoreV1().Secrets("fhir").Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "kiln-rig"}, StringData: podEnv}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	k := &kilnProc{t: t, bin: bin, env: []string{"KILN_POSTGRES_URL=" + pgURL},
		args: append([]string{"--launcher", "kubernetes", "--k8s-kubeconfig", kubeconfig, "--k8s-namespace", "fhir", "--k8s-image", "kiln:rig",
			"--k8s-service-account", "kiln-worker", "--k8s-env-from-secrets", "kiln-rig", "--workers-per-job", "3", "--max-launches", "3",
			"--sink", "s3", "--s3-bucket", bucket, "--s3-endpoint", s3URL, "--s3-path-style", "--export-unit-size", "4000", "--unit-lease", "2s",
			"--log-level", "warn"}, common...)}
	k.start()
	defer k.stop()
	loc := k.kickOff("/$export?requestsMemory=1Gi&limitsMemory=3Gi&ttlSecondsAfterFinished=1")
	id := loc[strings.LastIndex(loc, "/")+1:]

	// Kill one worker once all three pods run and units are being done.
	conn, err := pgx.Connect(ctx, pgURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	units := pgx.Identifier{schema, "units"}.Sanitize()
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(20 * time.Millisecond) {
		var running, done int
		conn.QueryRow(ctx, `SELECT count(*) FILTER (WHERE state='running'), count(*) FILTER (WHERE state='done') FROM `+units+` WHERE job=$1`, id).Scan(&running, &done)
		if r.node.running("fhir") == 3 && running >= 2 && done >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the Job's pods never all ran units (pods %d, units running %d, done %d)", r.node.running("fhir"), running, done)
		}
	}
	killed := r.node.kill("fhir")
	t.Logf("killed the worker of pod %s", killed)
	code, m := awaitExport(t, loc, 10*time.Minute)
	if code != 200 {
		t.Fatalf("export: %d %s", code, m.Outcome)
	}
	checkExport(t, loc, m, want)

	j, err := db.GetJob(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var redone int
	conn.QueryRow(ctx, `SELECT count(*) FROM `+units+` WHERE job=$1 AND attempts > 1`, id).Scan(&redone)
	if j.Launches < 2 || redone == 0 {
		t.Errorf("after the kill: %d launches, %d units redone; want a relaunch and a redone unit", j.Launches, redone)
	}
	// The pods the API server stored carry the kick-off's parameters.
	r.node.mu.Lock()
	pods := 0
	for _, p := range r.node.seen {
		c := p.Spec.Containers[0]
		pods++
		if req, lim := c.Resources.Requests[corev1.ResourceMemory], c.Resources.Limits[corev1.ResourceMemory]; req.String() != "1Gi" || lim.String() != "3Gi" ||
			p.Spec.ServiceAccountName != "kiln-worker" || strings.Join(c.Args, " ") != "worker --job "+id {
			t.Errorf("pod %s: requests %s, limits %s, account %s, args %v", p.Name, req.String(), lim.String(), p.Spec.ServiceAccountName, c.Args)
		}
	}
	r.node.mu.Unlock()
	if pods < 4 {
		t.Errorf("%d pods ran; want the first launch's three and a relaunch", pods)
	}
	// ttlSecondsAfterFinished=1: the TTL controller removes the finished Jobs.
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		list, err := r.admin.BatchV1().Jobs("fhir").List(ctx, metav1.ListOptions{LabelSelector: k8s.LabelJob + "=" + id})
		if err == nil && len(list.Items) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("export Jobs left after their TTL: %d", len(list.Items))
		}
	}
	// Workers that can never run (OOM-killed at start): the export is
	// relaunched until --max-launches (3) is spent, then fails, saying why.
	loc = k.kickOff("/$export?_type=Patient&limitsMemory=8Mi&requestsMemory=8Mi")
	id = loc[strings.LastIndex(loc, "/")+1:]
	code, m = awaitExport(t, loc, 3*time.Minute)
	if code == 200 || !strings.Contains(m.Outcome, "worker Job") {
		t.Fatalf("an export whose workers are OOM-killed: %d %s", code, m.Outcome)
	}
	if j, err = db.GetJob(ctx, id); err != nil || j.Launches != 3 {
		t.Fatalf("crash-looping workers: %d launches (%v), want --max-launches 3", j.Launches, err)
	}
	launches := map[string]bool{}
	r.node.mu.Lock()
	for _, p := range r.node.seen {
		if p.Labels[k8s.LabelJob] == id {
			launches[p.Labels[k8s.LabelLaunch]] = true
		}
	}
	r.node.mu.Unlock()
	if len(launches) != 3 {
		t.Errorf("pods of %d launches reached the node, want 3: %v", len(launches), launches)
	}
	// A Role missing a verb: the next export fails at once, saying so.
	role, err := os.ReadFile(filepath.Join(manifests, "role.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	narrowed := strings.Replace(string(role), `verbs: ["create", "get", "list", "watch", "delete"]`, `verbs: ["get", "list", "watch", "delete"]`, 1)
	if narrowed == string(role) {
		t.Fatal("role.yaml no longer has the verbs line this test narrows")
	}
	if out, err := r.kubectl([]byte(narrowed), "apply", "-n", "fhir", "-f", "-"); err != nil {
		t.Fatalf("apply the narrowed Role: %v\n%s", err, out)
	}
	code, m = awaitExport(t, k.kickOff("/$export?_type=Patient"), 2*time.Minute)
	if code == 200 || !strings.Contains(m.Outcome, "its Role needs create") || !strings.Contains(m.Outcome, "forbidden") {
		t.Fatalf("export with a Role that cannot create Jobs: %d %s", code, m.Outcome)
	}
}

func dataDir615(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"../../../shared/data/synthea-r4-615", "../../shared/data/synthea-r4-615"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Fatal("synthea-r4-615 not found beside the repository")
	return ""
}
