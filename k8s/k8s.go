// Package k8s is the Launcher on Kubernetes (client-go): each export becomes
// a batch/v1 Job whose pods run `kiln worker --job ID` with the server's
// image, sharing its store (PostgreSQL) and sink (S3). The seed's pod
// parameters shape the Job.
package k8s

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
)

// Labels on every Job and pod.
const (
	LabelComponent = "app.kubernetes.io/component"
	LabelJob       = "kiln.io/export-job"
	LabelLaunch    = "kiln.io/launch"
	component      = "export-worker"
)

// Config shapes the Jobs. It comes from Kiln's configuration, never from the
// server's own pod spec.
type Config struct {
	Namespace      string
	Image          string
	ServiceAccount string
	// Env is added to the worker container; EnvFromSecrets and
	// EnvFromConfigMaps are referenced whole (KILN_POSTGRES_URL, AWS keys, …).
	Env               []corev1.EnvVar
	EnvFromSecrets    []string
	EnvFromConfigMaps []string
	BackoffLimit      int32
	ActiveDeadline    time.Duration
	// Defaults for the seed's pod parameters (Helix: 2G, 8G, 60 s).
	DefaultRequestsMemory string
	DefaultLimitsMemory   string
	DefaultTTL            int32
	// WorkersPerJob is the Job's parallelism: pods that share the units.
	WorkersPerJob int32
	Logger        *slog.Logger
}

func (c *Config) defaults() {
	if c.Namespace == "" {
		c.Namespace = "default"
	}
	if c.ActiveDeadline <= 0 {
		c.ActiveDeadline = 24 * time.Hour
	}
	if c.DefaultRequestsMemory == "" {
		c.DefaultRequestsMemory = "2G"
	}
	if c.DefaultLimitsMemory == "" {
		c.DefaultLimitsMemory = "8G"
	}
	if c.DefaultTTL == 0 {
		c.DefaultTTL = 60
	}
	if c.WorkersPerJob <= 0 {
		c.WorkersPerJob = 1
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Launcher creates and watches export Jobs.
type Launcher struct {
	client kubernetes.Interface
	cfg    Config
}

// New returns a Launcher on client.
func New(client kubernetes.Interface, cfg Config) *Launcher {
	cfg.defaults()
	return &Launcher{client: client, cfg: cfg}
}

// Client builds a clientset: in-cluster configuration, or kubeconfig when given.
func Client(kubeconfig string) (kubernetes.Interface, error) {
	var rc *rest.Config
	var err error
	if kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("k8s: configuration: %w", err)
	}
	return kubernetes.NewForConfig(rc)
}

// quantity turns a validated memory parameter into a Kubernetes quantity; a
// bare number means gigabytes, as the seed documents.
func quantity(s string) (resource.Quantity, error) {
	if _, err := export.ParseMemory(s); err != nil {
		return resource.Quantity{}, err
	}
	if strings.Trim(s, "0123456789.") == "" {
		s += "G"
	}
	return resource.ParseQuantity(s)
}

// JobName is the Job of a job's n-th launch.
func JobName(jobID string, launch int) string {
	return fmt.Sprintf("kiln-export-%s-%d", jobID, launch)
}

// JobSpec builds the batch/v1 Job for an export's current launch.
func (l *Launcher) JobSpec(j *kiln.Job) (*batchv1.Job, error) {
	req := &j.Request
	reqMem := l.cfg.DefaultRequestsMemory
	switch {
	case req.RequestsMemory != "":
		reqMem = req.RequestsMemory
	case req.RAM != "":
		// The seed calls ram "ram (in GB)": the memory request (Helix put it on CPU).
		reqMem = req.RAM
	}
	limMem := l.cfg.DefaultLimitsMemory
	if req.LimitsMemory != "" {
		limMem = req.LimitsMemory
	}
	rq, err := quantity(reqMem)
	if err != nil {
		return nil, fmt.Errorf("k8s: memory request: %w", err)
	}
	lq, err := quantity(limMem)
	if err != nil {
		return nil, fmt.Errorf("k8s: memory limit: %w", err)
	}
	if lq.Cmp(rq) < 0 {
		// The defaults can conflict with one given parameter: the limit follows the request up.
		lq = rq.DeepCopy()
	}
	ttl := l.cfg.DefaultTTL
	if req.TTLSecondsAfterFinished != nil {
		ttl = int32(*req.TTLSecondsAfterFinished)
	}
	deadline := int64(l.cfg.ActiveDeadline.Seconds())
	backoff := l.cfg.BackoffLimit
	parallelism := l.cfg.WorkersPerJob
	labels := map[string]string{
		"app.kubernetes.io/name": "kiln",
		LabelComponent:           component,
		LabelJob:                 j.ID,
		LabelLaunch:              strconv.Itoa(j.Launches),
	}
	env := append([]corev1.EnvVar{}, l.cfg.Env...)
	if req.LogLevel != "" {
		env = append(env, corev1.EnvVar{Name: "KILN_LOG_LEVEL", Value: req.LogLevel})
	}
	var envFrom []corev1.EnvFromSource
	for _, s := range l.cfg.EnvFromSecrets {
		envFrom = append(envFrom, corev1.EnvFromSource{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: s}}})
	}
	for _, c := range l.cfg.EnvFromConfigMaps {
		envFrom = append(envFrom, corev1.EnvFromSource{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: c}}})
	}
	return &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: JobName(j.ID, j.Launches), Namespace: l.cfg.Namespace, Labels: labels},
		Spec: batchv1.JobSpec{
			Parallelism:             &parallelism,
			BackoffLimit:            &backoff,
			ActiveDeadlineSeconds:   &deadline,
			TTLSecondsAfterFinished: &ttl,
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					RestartPolicy:      corev1.RestartPolicyNever,
					ServiceAccountName: l.cfg.ServiceAccount,
					Containers: []corev1.Container{{
						Name:    "worker",
						Image:   l.cfg.Image,
						Args:    []string{"worker", "--job", j.ID},
						Env:     env,
						EnvFrom: envFrom,
						Resources: corev1.ResourceRequirements{
							Requests: corev1.ResourceList{corev1.ResourceMemory: rq},
							Limits:   corev1.ResourceList{corev1.ResourceMemory: lq},
						},
					}},
				},
			},
		},
	}, nil
}

// Launch implements kiln.Launcher. A namespace quota refusal is ETHROTTLED:
// the export stays accepted and is launched again later.
func (l *Launcher) Launch(ctx context.Context, j *kiln.Job) error {
	spec, err := l.JobSpec(j)
	if err != nil {
		return err
	}
	_, err = l.client.BatchV1().Jobs(l.cfg.Namespace).Create(ctx, spec, metav1.CreateOptions{})
	switch {
	case err == nil, apierrors.IsAlreadyExists(err):
		return nil
	case apierrors.IsForbidden(err) && strings.Contains(err.Error(), "exceeded quota"):
		return &kiln.Error{Code: kiln.ETHROTTLED, Message: "namespace quota exceeded: " + err.Error()}
	case apierrors.IsForbidden(err) && strings.Contains(err.Error(), "cannot create resource"):
		// An RBAC denial: no retry helps, the launcher's account lacks a
		// permission. Other 403s (admission, a terminating namespace) are
		// retried like any launch failure.
		return &kiln.Error{Code: kiln.EFORBIDDEN, Message: fmt.Sprintf("Kiln may not create its export Job in namespace %s (%s); its Role needs create, get, list, watch and delete on batch jobs (deploy/kubernetes/role.yaml)", l.cfg.Namespace, err.Error())}
	}
	return fmt.Errorf("k8s: create Job %s: %w", spec.Name, err)
}

// Stop implements kiln.Launcher: deletes the job's Jobs and their pods.
func (l *Launcher) Stop(ctx context.Context, jobID string) error {
	bg := metav1.DeletePropagationBackground
	jobs := l.client.BatchV1().Jobs(l.cfg.Namespace)
	list, err := jobs.List(ctx, metav1.ListOptions{LabelSelector: LabelJob + "=" + jobID})
	if err != nil {
		return fmt.Errorf("k8s: list Jobs of %s: %w", jobID, err)
	}
	for _, j := range list.Items {
		if err := jobs.Delete(ctx, j.Name, metav1.DeleteOptions{PropagationPolicy: &bg}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("k8s: delete Job %s: %w", j.Name, err)
		}
	}
	return nil
}

// Watch implements kiln.Launcher: Complete, Failed and deleted export Jobs.
func (l *Launcher) Watch(ctx context.Context, report func(kiln.LaunchEvent)) error {
	w, err := l.client.BatchV1().Jobs(l.cfg.Namespace).Watch(ctx, metav1.ListOptions{LabelSelector: LabelComponent + "=" + component})
	if err != nil {
		return fmt.Errorf("k8s: watch Jobs: %w", err)
	}
	defer w.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.ResultChan():
			if !ok {
				return nil // the caller watches again
			}
			job, ok := ev.Object.(*batchv1.Job)
			if !ok {
				continue
			}
			launch, _ := strconv.Atoi(job.Labels[LabelLaunch])
			le := kiln.LaunchEvent{Job: job.Labels[LabelJob], Launch: launch}
			if ev.Type == watch.Deleted {
				le.Outcome, le.Reason = "deleted", "Job "+job.Name+" was deleted"
				report(le)
				continue
			}
			for _, c := range job.Status.Conditions {
				if c.Status != corev1.ConditionTrue {
					continue
				}
				switch c.Type {
				case batchv1.JobComplete:
					le.Outcome = "succeeded"
				case batchv1.JobFailed:
					le.Outcome, le.Reason = "failed", strings.TrimSpace(c.Reason+" "+c.Message)
				}
			}
			if le.Outcome != "" {
				report(le)
			}
		}
	}
}

var _ kiln.Launcher = (*Launcher)(nil)
