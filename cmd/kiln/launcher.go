package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/k8s"
	"github.com/kiln-fhir/kiln/proc"
)

type launcherFlags struct {
	kind                           string
	namespace, image, sa, kubecfg  string
	env, envSecrets, envConfigMaps string
	backoff                        int
	deadline                       time.Duration
	reqMem, limMem                 string
	ttl                            int
	workersPerJob                  int
	maxLaunches                    int
}

func (f *launcherFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.kind, "launcher", "inprocess", "who runs export units: inprocess (this server's workers), kubernetes (a batch/v1 Job per export running kiln worker) or process (a local kiln worker process per export)")
	fs.StringVar(&f.namespace, "k8s-namespace", "default", "namespace of export Jobs")
	fs.StringVar(&f.image, "k8s-image", "", "container image of export Jobs (Kiln's own image)")
	fs.StringVar(&f.sa, "k8s-service-account", "", "service account of export Job pods")
	fs.StringVar(&f.kubecfg, "k8s-kubeconfig", "", "kubeconfig file (default: in-cluster configuration)")
	fs.StringVar(&f.env, "k8s-env", "", "KEY=VALUE,… set in export Job pods (e.g. KILN_STORE=postgres,KILN_SINK=s3)")
	fs.StringVar(&f.envSecrets, "k8s-env-from-secrets", "", "Secrets whose keys become environment variables of export Job pods")
	fs.StringVar(&f.envConfigMaps, "k8s-env-from-configmaps", "", "ConfigMaps whose keys become environment variables of export Job pods")
	fs.IntVar(&f.backoff, "k8s-backoff-limit", 0, "backoffLimit of export Jobs")
	fs.DurationVar(&f.deadline, "k8s-active-deadline", 24*time.Hour, "activeDeadlineSeconds of export Jobs")
	fs.StringVar(&f.reqMem, "k8s-requests-memory", "2G", "memory request when the kick-off gives neither requestsMemory nor ram")
	fs.StringVar(&f.limMem, "k8s-limits-memory", "8G", "memory limit when the kick-off gives no limitsMemory")
	fs.IntVar(&f.ttl, "k8s-ttl", 60, "ttlSecondsAfterFinished when the kick-off gives none")
	fs.IntVar(&f.workersPerJob, "workers-per-job", 1, "pods per export Job (parallelism), or processes per export with --launcher process, sharing its units")
	fs.IntVar(&f.maxLaunches, "max-launches", 3, "how often an export's workers are started before the export fails")
}

// launcher builds the configured Launcher (nil for inprocess).
// reachable refuses a launcher whose workers could not reach the data: they
// are other processes, which share the export through the store (only
// PostgreSQL is shared: SQLite is one process's embedded database) and,
// in pods, write its files to a sink they can reach (S3, not a local folder).
func (f *launcherFlags) reachable(store *storeFlags, sink *sinkFlags) error {
	if f.kind != "process" && f.kind != "kubernetes" {
		return nil
	}
	if store.kind != "postgres" {
		return fmt.Errorf("--launcher %s needs --store postgres: its workers are other processes, and an embedded SQLite store is this process's alone", f.kind)
	}
	if f.kind == "kubernetes" && sink.kind != "s3" {
		return fmt.Errorf("--launcher kubernetes needs --sink s3: the Job's pods cannot write to this machine's folder")
	}
	return nil
}

func (f *launcherFlags) launcher(store *storeFlags, sink *sinkFlags, log *slog.Logger) (kiln.Launcher, error) {
	if err := f.reachable(store, sink); err != nil {
		return nil, err
	}
	switch f.kind {
	case "inprocess":
		return nil, nil
	case "process":
		self, err := os.Executable()
		if err != nil {
			return nil, err
		}
		args := []string{"--store", store.kind, "--data", store.data, "--sink", sink.kind}
		if store.postgresSchema != "" {
			args = append(args, "--postgres-schema", store.postgresSchema)
		}
		if sink.kind == "s3" {
			args = append(args, "--s3-bucket", sink.s3.Bucket, "--s3-prefix", sink.s3.Prefix, "--s3-endpoint", sink.s3.Endpoint,
				"--s3-path-style="+strconv.FormatBool(sink.s3.PathStyle), "--s3-region", sink.s3.Region)
		}
		var env []string
		if store.postgresURL != "" {
			// Through the environment, not argv: ps shows argv to every user.
			env = append(env, "KILN_POSTGRES_URL="+store.postgresURL)
		}
		l := proc.New(self, args, log)
		l.Env = env
		l.Workers = f.workersPerJob
		return l, nil
	case "kubernetes":
		if f.image == "" {
			return nil, fmt.Errorf("--launcher kubernetes needs --k8s-image")
		}
		client, err := k8s.Client(f.kubecfg)
		if err != nil {
			return nil, err
		}
		cfg := k8s.Config{
			Namespace: f.namespace, Image: f.image, ServiceAccount: f.sa,
			EnvFromSecrets: splitList(f.envSecrets), EnvFromConfigMaps: splitList(f.envConfigMaps),
			BackoffLimit: int32(f.backoff), ActiveDeadline: f.deadline,
			DefaultRequestsMemory: f.reqMem, DefaultLimitsMemory: f.limMem, DefaultTTL: int32(f.ttl),
			WorkersPerJob: int32(f.workersPerJob), Logger: log,
		}
		for _, kv := range splitList(f.env) {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return nil, fmt.Errorf("--k8s-env %q: use KEY=VALUE", kv)
			}
			cfg.Env = append(cfg.Env, corev1.EnvVar{Name: k, Value: v})
		}
		return k8s.New(client, cfg), nil
	}
	return nil, fmt.Errorf("--launcher %q: use inprocess, kubernetes or process", f.kind)
}
