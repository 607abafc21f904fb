package export

import (
	"context"
	"sync"
	"time"

	"github.com/kiln-fhir/kiln"
)

// The engine has two roles, kept apart as River keeps them: the worker
// (claim a unit, heartbeat, execute, finish — and finalize the job whose
// last unit it finished) and the coordinator (finalize jobs a worker could
// not, sweep expired exports, reclaim units whose worker stopped, launch and
// supervise launched workers). kiln serve plays both; kiln worker only
// works. Among several API servers on one PostgreSQL store, the
// coordinator's maintenance runs on one elected leader; the others stand by
// and take over when its lease runs out. Whatever a job needs to be run and
// finished the same way by any process travels with it (kiln.JobSettings).

// coordinatorRole is the leadership every API server of a store competes for.
const coordinatorRole = "export-coordinator"

// Run plays both roles until ctx ends: it coordinates and, unless a
// Launcher runs units elsewhere, works too. A store that is this process's
// alone (SQLite) first gets back the units the previous run left claimed.
func (s *Service) Run(ctx context.Context) error {
	if r, ok := s.jobs.(interface {
		ReleaseAll(context.Context) (int, error)
	}); ok {
		n, err := r.ReleaseAll(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if n > 0 {
			s.log.Info("export units handed back after restart", "units", n)
		}
	}
	var wg sync.WaitGroup
	if s.cfg.Launcher == nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.Work(ctx)
		}()
	}
	err := s.Coordinate(ctx)
	wg.Wait()
	return err
}

// Work is the worker role: cfg.Workers goroutines claim and run units until
// ctx ends. It does no maintenance.
func (s *Service) Work(ctx context.Context) {
	var wg sync.WaitGroup
	for i := range s.cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.work(ctx, i)
		}()
	}
	wg.Wait()
}

// Coordinate is the coordinator role until ctx ends. With a store that
// elects (kiln.Elector), only while this process leads; it renews the lease
// at a third of its length and resigns on the way out.
func (s *Service) Coordinate(ctx context.Context) error {
	el, ok := s.jobs.(kiln.Elector)
	if !ok {
		s.leading.Store(true)
		defer s.leading.Store(false)
		return s.maintain(ctx)
	}
	var (
		stop func()
		done chan error
	)
	lead := func() {
		mctx, cancel := context.WithCancel(ctx)
		done = make(chan error, 1)
		stop = cancel
		s.leading.Store(true)
		go func() { done <- s.maintain(mctx) }()
	}
	standDown := func() error {
		stop()
		err := <-done
		s.leading.Store(false)
		stop, done = nil, nil
		return err
	}
	defer func() {
		if stop != nil {
			standDown()
		}
		// A clean exit hands the role on at once, not a lease later.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := el.Resign(rctx, coordinatorRole, s.holder); err != nil {
			s.log.Warn("resign export coordination", "err", err)
		}
	}()
	// renewed is when the lease was last taken or renewed, on this
	// process's own clock: a renewal that hangs (a full connection pool, a
	// half-dead network) must not keep maintenance going past the lease.
	var renewed time.Time
	try := func() {
		lctx, cancel := context.WithTimeout(ctx, s.cfg.LeaderLease/3)
		asked := time.Now()
		held, err := el.Lead(lctx, coordinatorRole, s.holder, s.cfg.LeaderLease)
		cancel()
		if ctx.Err() != nil {
			return // shutting down: the deferred stand-down and resign follow
		}
		if err != nil {
			s.log.Warn("export coordinator election", "err", err)
			// Unsure whether the lease still holds: stand down before it
			// can run out under us, rather than risk two coordinators.
			held = false
		}
		if held {
			renewed = asked
		}
		switch {
		case held && stop == nil:
			s.log.Info("leading export coordination", "holder", s.holder)
			lead()
		case !held && stop != nil:
			s.log.Warn("export coordination given up", "holder", s.holder, "renewed", time.Since(renewed).Round(time.Millisecond))
			standDown()
		case stop != nil && time.Since(renewed) > s.cfg.LeaderLease*2/3:
			s.log.Warn("export coordination renewal overdue; standing down", "holder", s.holder)
			standDown()
		}
	}
	try()
	every(ctx, s.cfg.LeaderLease/3, func() bool {
		if done != nil {
			select {
			case err := <-done:
				// Maintenance stopped by itself (a start-up failure): try again.
				s.log.Error("export coordination stopped", "err", err)
				stop()
				s.leading.Store(false)
				stop, done = nil, nil
			default:
			}
		}
		try()
		return true
	})
	return nil
}

// Leading reports whether this process does the coordinator's maintenance now.
func (s *Service) Leading() bool { return s.leading.Load() }

// MaintenancePasses counts the maintenance passes this process has made
// (finalize, sweep and reclaim rounds), for tests and metrics.
func (s *Service) MaintenancePasses() int64 { return s.maintained.Load() }

// maintain runs the coordinator's loops until ctx ends.
func (s *Service) maintain(ctx context.Context) error {
	// A job that cannot be finished must not keep the rest of maintenance
	// from starting: recover logs it, and the loops below retry it.
	if err := s.recover(ctx); err != nil && ctx.Err() == nil {
		s.log.Error("finish exports whose units are all done", "err", err)
	}
	s.maintained.Add(1)
	var wg sync.WaitGroup
	if s.cfg.Launcher != nil {
		wg.Add(2)
		go func() {
			defer wg.Done()
			s.relaunch(ctx)
		}()
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				if err := s.cfg.Launcher.Watch(ctx, func(ev kiln.LaunchEvent) { s.onLaunchEvent(ctx, ev) }); err != nil && ctx.Err() == nil {
					s.log.Error("watch export workers", "err", err)
					select {
					case <-ctx.Done():
					case <-time.After(time.Second):
					}
				}
			}
		}()
	}
	wg.Add(3)
	go func() {
		defer wg.Done()
		s.sweep(ctx)
	}()
	go func() {
		defer wg.Done()
		// A job whose last unit could not finalize it (the store was away
		// at that moment) is finalized here.
		every(ctx, s.cfg.RecoverEvery, func() bool {
			if err := s.recover(ctx); err != nil && ctx.Err() == nil && !s.transient(err) {
				s.log.Error("finish exports whose units are all done", "err", err)
			}
			s.maintained.Add(1)
			return true
		})
	}()
	go func() {
		defer wg.Done()
		s.reclaim(ctx)
	}()
	wg.Wait()
	return nil
}
