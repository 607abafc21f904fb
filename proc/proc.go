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

	mu      sync.Mutex
	running map[string]*exec.Cmd
	events  chan kiln.LaunchEvent
}

// New returns a Launcher.
func New(command string, args []string, log *slog.Logger) *Launcher {
	if log == nil {
		log = slog.Default()
	}
	return &Launcher{Command: command, Args: args, Logger: log, running: map[string]*exec.Cmd{}, events: make(chan kiln.LaunchEvent, 64)}
}

// Launch implements kiln.Launcher.
func (l *Launcher) Launch(ctx context.Context, j *kiln.Job) error {
	args := append([]string{"worker", "--job", j.ID}, l.Args...)
	if j.Request.LogLevel != "" {
		args = append(args, "--log-level", j.Request.LogLevel)
	}
	cmd := exec.Command(l.Command, args...)
	cmd.Env = append(os.Environ(), l.Env...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("proc: start worker: %w", err)
	}
	l.mu.Lock()
	l.running[j.ID] = cmd
	l.mu.Unlock()
	launch := j.Launches
	go func() {
		err := cmd.Wait()
		l.mu.Lock()
		if l.running[j.ID] == cmd {
			delete(l.running, j.ID)
		}
		l.mu.Unlock()
		ev := kiln.LaunchEvent{Job: j.ID, Launch: launch, Outcome: "succeeded"}
		if err != nil {
			ev.Outcome, ev.Reason = "failed", err.Error()
		}
		l.events <- ev
	}()
	l.Logger.Info("export worker process started", "job", j.ID, "pid", cmd.Process.Pid)
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

// Stop implements kiln.Launcher: kills the job's worker.
func (l *Launcher) Stop(ctx context.Context, jobID string) error {
	l.mu.Lock()
	cmd := l.running[jobID]
	l.mu.Unlock()
	if cmd != nil && cmd.Process != nil {
		cmd.Process.Kill()
	}
	return nil
}

var _ kiln.Launcher = (*Launcher)(nil)
