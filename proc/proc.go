// Package proc is a Launcher that runs each export's worker as a local
// process (`kiln worker --job ID`): for a single machine that wants exports
// out of the API server's process, and for testing the launcher path without
// a cluster. The worker shares the server's store and sink through its flags.
package proc

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"sync"

	"github.com/kiln-fhir/kiln"
)

// Launcher starts worker processes.
type Launcher struct {
	// Command is the kiln binary; Args come after "worker --job ID" (store, sink, …).
	Command string
	Args    []string
	Env     []string
	Logger  *slog.Logger
	// Workers is how many processes share each export's units (default 1),
	// as --workers-per-job pods do in Kubernetes.
	Workers int

	mu      sync.Mutex
	running map[string][]*exec.Cmd
	events  chan kiln.LaunchEvent
}

// New returns a Launcher.
func New(command string, args []string, log *slog.Logger) *Launcher {
	if log == nil {
		log = slog.Default()
	}
	return &Launcher{Command: command, Args: args, Logger: log, running: map[string][]*exec.Cmd{}, events: make(chan kiln.LaunchEvent, 64)}
}

// Launch implements kiln.Launcher. Like a Kubernetes Job with parallelism,
// the launch has succeeded when its processes have all ended and one of them
// succeeded; it has failed when every one failed.
func (l *Launcher) Launch(ctx context.Context, j *kiln.Job) error {
	args := append([]string{"worker", "--job", j.ID}, l.Args...)
	if j.Request.LogLevel != "" {
		args = append(args, "--log-level", j.Request.LogLevel)
	}
	var cmds []*exec.Cmd
	for range max(l.Workers, 1) {
		cmd := exec.Command(l.Command, args...)
		cmd.Env = append(os.Environ(), l.Env...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Start(); err != nil {
			for _, c := range cmds {
				c.Process.Kill()
				c.Wait()
			}
			return fmt.Errorf("proc: start worker: %w", err)
		}
		l.Logger.Info("export worker process started", "job", j.ID, "pid", cmd.Process.Pid)
		cmds = append(cmds, cmd)
	}
	l.mu.Lock()
	l.running[j.ID] = cmds
	l.mu.Unlock()
	launch := j.Launches
	go func() {
		ev := kiln.LaunchEvent{Job: j.ID, Launch: launch, Outcome: "failed"}
		for _, cmd := range cmds {
			if err := cmd.Wait(); err != nil {
				ev.Reason = err.Error()
			} else {
				ev.Outcome = "succeeded"
			}
		}
		if ev.Outcome == "succeeded" {
			ev.Reason = ""
		}
		l.mu.Lock()
		if len(l.running[j.ID]) > 0 && l.running[j.ID][0] == cmds[0] {
			delete(l.running, j.ID)
		}
		l.mu.Unlock()
		l.events <- ev
	}()
	return nil
}

// Watch implements kiln.Launcher.
func (l *Launcher) Watch(ctx context.Context, report func(kiln.LaunchEvent)) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev := <-l.events:
			report(ev)
		}
	}
}

// Stop implements kiln.Launcher: kills the job's workers.
func (l *Launcher) Stop(ctx context.Context, jobID string) error {
	l.mu.Lock()
	cmds := l.running[jobID]
	l.mu.Unlock()
	for _, cmd := range cmds {
		cmd.Process.Kill()
	}
	return nil
}

var _ kiln.Launcher = (*Launcher)(nil)
