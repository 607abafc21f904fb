package kiln

import "context"

// Launcher starts what runs an export job's units outside the API server
// (Kubernetes Jobs running `kiln worker`, or local processes). Without one,
// the API server's own workers run them.
type Launcher interface {
	// Launch starts the job's workers. An ETHROTTLED error (a namespace quota,
	// say) leaves the job accepted, to be launched again later.
	Launch(ctx context.Context, j *Job) error
	// Watch reports the end of launched workers until ctx ends.
	Watch(ctx context.Context, report func(LaunchEvent)) error
	// Stop removes a job's workers (after a cancel).
	Stop(ctx context.Context, jobID string) error
}

// LaunchEvent says how a job's launched workers ended.
type LaunchEvent struct {
	Job string
	// Outcome is "succeeded", "failed" or "deleted".
	Outcome string
	Reason  string
	// Launch is the Job.Launches value of the launch that ended; events of
	// earlier launches are stale.
	Launch int
}
