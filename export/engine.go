// Package export is Kiln's bulk export engine: it validates kick-offs, plans
// a job into work units, runs them on a pool of workers that stream stored
// bytes from the store to the sink, and assembles the manifest.
package export

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/metrics"
)

// Store is what the engine reads resources from.
type Store interface {
	kiln.ResourceStore
	kiln.ExportReader
}

// Config tunes the engine. Zero values take the defaults noted.
type Config struct {
	// Workers run units in parallel (default: number of CPUs).
	Workers int
	// UnitSize is the number of resources per unit of a system export (100,000).
	UnitSize int
	// MaxFileResources and MaxFileBytes split output files (1,000,000 and 1 GiB).
	MaxFileResources int64
	MaxFileBytes     int64
	// AssociatedIndexBytes bounds the memory includeAssociatedData may use
	// to index Provenance by target (256 MiB, about 2.5 million targets);
	// an export that needs more fails saying so, rather than growing with
	// the data.
	AssociatedIndexBytes int64
	// Retention is how long finished jobs' files are kept (24 h).
	Retention time.Duration
	// SweepEvery is how often expired jobs are removed (1 min).
	SweepEvery time.Duration
	// MaxActiveJobs and MaxActiveJobsPerOwner limit unfinished jobs (10 and 3).
	MaxActiveJobs, MaxActiveJobsPerOwner int
	// Lease is how long a claimed unit stays with its worker (10 min).
	Lease time.Duration
	// Launcher, if set, runs units elsewhere (Kubernetes Jobs, processes): the
	// service then runs no unit workers of its own, and launches, watches and
	// relaunches those instead.
	Launcher kiln.Launcher
	// MaxLaunches bounds how often a job's workers are started (default 3);
	// RelaunchEvery is how often pending launches are retried (default 10 s).
	MaxLaunches   int
	RelaunchEvery time.Duration
	// RecoverEvery is how often the coordinator finishes jobs whose units
	// are all done but that no worker or launch event finished (5 s).
	RecoverEvery time.Duration
	// LeaderLease is how long the coordinator's leadership lasts without
	// renewal (15 s): when the leading process dies, another API server
	// takes maintenance over within it. Only stores with kiln.Elector elect.
	LeaderLease time.Duration
	// Ref says which absolute references are this server's (for Group members).
	Ref    fhir.Options
	Logger *slog.Logger
	Now    func() time.Time
	// Metrics, if set, records units, resources and durations.
	Metrics *metrics.Metrics
}

func (c *Config) defaults() {
	if c.Workers <= 0 {
		c.Workers = runtime.NumCPU()
	}
	if c.UnitSize <= 0 {
		c.UnitSize = 100_000
	}
	if c.MaxFileResources <= 0 {
		c.MaxFileResources = 1_000_000
	}
	if c.MaxFileBytes <= 0 {
		c.MaxFileBytes = 1 << 30
	}
	if c.AssociatedIndexBytes <= 0 {
		c.AssociatedIndexBytes = 256 << 20
	}
	if c.Retention <= 0 {
		c.Retention = 24 * time.Hour
	}
	if c.SweepEvery <= 0 {
		c.SweepEvery = time.Minute
	}
	if c.MaxActiveJobs <= 0 {
		c.MaxActiveJobs = 10
	}
	if c.MaxActiveJobsPerOwner <= 0 {
		c.MaxActiveJobsPerOwner = 3
	}
	if c.Lease <= 0 {
		c.Lease = 10 * time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.MaxLaunches <= 0 {
		c.MaxLaunches = 3
	}
	if c.RelaunchEvery <= 0 {
		c.RelaunchEvery = 10 * time.Second
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.RecoverEvery <= 0 {
		c.RecoverEvery = 5 * time.Second
	}
	if c.LeaderLease <= 0 {
		c.LeaderLease = 15 * time.Second
	}
}

// Service runs exports.
type Service struct {
	store Store
	jobs  kiln.JobStore
	sink  kiln.Sink
	cfg   Config
	log   *slog.Logger

	mu sync.Mutex
	// sinks are this process's sinks for other locations jobs name, by location.
	sinks map[string]kiln.Sink
	// launching holds the jobs whose launch is under way in this process:
	// the relaunch loop must not start a second one between the launcher's
	// answer and LaunchPending being cleared (that spent launches twice).
	launching map[string]bool
	// running holds the cancel functions of units being run, per job.
	running map[string]map[int]context.CancelFunc
	// unitsDone is signalled whenever a unit stops running.
	unitsDone *sync.Cond
	wake      chan struct{}
	// holder names this process in leader elections; leading is true while
	// it coordinates; maintained counts its maintenance passes.
	holder     string
	leading    atomic.Bool
	maintained atomic.Int64
	// finished counts the units this service has run to the end.
	finished atomic.Int64
}

// UnitsFinished is how many units this service (this process) has run to the end.
func (s *Service) UnitsFinished() int64 { return s.finished.Load() }

// New returns an export service.
func New(store Store, jobs kiln.JobStore, sink kiln.Sink, cfg Config) *Service {
	cfg.defaults()
	s := &Service{store: store, jobs: jobs, sink: sink, cfg: cfg, log: cfg.Logger,
		running: map[string]map[int]context.CancelFunc{}, wake: make(chan struct{}, 1), holder: uuid.NewString(), sinks: map[string]kiln.Sink{}}
	s.unitsDone = sync.NewCond(&s.mu)
	return s
}

// Config returns the effective configuration.
func (s *Service) Config() Config { return s.cfg }

// throttled is the 429 for a job limit.
func throttled(le *kiln.LimitError) error {
	msg := fmt.Sprintf("the server is running %d exports, its limit; try again later", le.Running)
	if le.PerOwner {
		msg = fmt.Sprintf("you have %d exports running, the limit per client; wait for one to finish or cancel it", le.Running)
	}
	return &kiln.Error{Code: kiln.ETHROTTLED, Message: msg, RetryAfter: 30}
}

// Start validates what needs the store (patients, Group), plans the job and
// stores it as accepted. Workers pick it up.
func (s *Service) Start(ctx context.Context, req *kiln.ExportRequest, owner string) (*kiln.Job, error) {
	// A first check spares the planning of an export that cannot start;
	// CreateJob checks again, with the insert, and that one is binding.
	all, mine, err := s.jobs.Running(ctx, owner)
	if err != nil {
		return nil, err
	}
	lim := kiln.JobLimits{All: s.cfg.MaxActiveJobs, PerOwner: s.cfg.MaxActiveJobsPerOwner}
	if err := lim.Check(all, mine); err != nil {
		return nil, throttled(err.(*kiln.LimitError))
	}
	snap, err := s.store.SnapshotTime(ctx)
	if err != nil {
		return nil, err
	}
	var patients []string
	switch req.Level {
	case kiln.LevelPatient:
		if patients, err = s.patientsOf(ctx, snap, req); err != nil {
			return nil, err
		}
	case kiln.LevelGroup:
		if patients, err = s.groupPatients(ctx, snap, req); err != nil {
			return nil, err
		}
	}
	present, err := s.store.TypesPresent(ctx)
	if err != nil {
		return nil, err
	}
	job := &kiln.Job{
		ID:              uuid.NewString(),
		Owner:           owner,
		State:           kiln.JobAccepted,
		Request:         *req,
		TransactionTime: snap,
		Created:         s.cfg.Now().UTC(),
		Patients:        len(patients),
		Settings: kiln.JobSettings{MaxFileResources: s.cfg.MaxFileResources, MaxFileBytes: s.cfg.MaxFileBytes,
			Retention: s.cfg.Retention, Bases: s.cfg.Ref.Bases},
	}
	if ls, ok := s.sink.(kiln.LocatedSink); ok {
		job.Settings.Sink = ls.Location()
	}
	job.Updated = job.Created
	units, err := s.plan(ctx, job, present, len(patients))
	if err != nil {
		return nil, err
	}
	job.UnitsTotal = len(units)
	job.LaunchPending = s.cfg.Launcher != nil && len(units) > 0
	if req.Level != kiln.LevelSystem {
		if err := s.jobs.SetPatients(ctx, job.ID, patients); err != nil {
			return nil, err
		}
	}
	if err := s.jobs.CreateJob(ctx, job, units, lim); err != nil {
		if req.Level != kiln.LevelSystem {
			// The patients were stored first: take them away again, even
			// when the client has gone.
			if derr := s.jobs.DeleteJob(context.WithoutCancel(ctx), job.ID); derr != nil {
				s.log.Warn("remove the patients of an export not stored", "job", job.ID, "err", derr)
			}
		}
		var le *kiln.LimitError
		if errors.As(err, &le) {
			// Another kick-off took the last place since the first check.
			return nil, throttled(le)
		}
		return nil, err
	}
	s.log.Info("export accepted", "job", job.ID, "level", req.Level, "owner", owner, "units", len(units), "patients", len(patients), "transactionTime", fhir.FormatInstant(snap))
	if len(units) == 0 {
		if err := s.finalize(ctx, job.ID); err != nil {
			return nil, err
		}
	}
	if job.LaunchPending {
		// A launch that fails now is retried by the relaunch loop: the job is
		// stored, so the client gets its 202 whatever the cluster says.
		s.launch(context.WithoutCancel(ctx), job.ID)
	}
	s.poke()
	return job, nil
}

func (s *Service) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Service) patientsOf(ctx context.Context, snap time.Time, req *kiln.ExportRequest) ([]string, error) {
	if len(req.Patients) == 0 {
		all, err := s.store.PatientsAt(ctx, snap, nil)
		if err != nil || req.Tenants == nil {
			return all, err
		}
		// Only the patients the token may see: the others' compartments
		// would bring in what only their records reference.
		return s.visible(ctx, "Patient", all, req.Tenants)
	}
	ids := uniqSorted(req.Patients)
	found, err := s.store.PatientsAt(ctx, snap, ids)
	if err != nil {
		return nil, err
	}
	if req.Tenants != nil {
		// Another tenant's patient "does not exist" either: the answer must
		// not tell a caller which ids are in use elsewhere.
		if found, err = s.visible(ctx, "Patient", found, req.Tenants); err != nil {
			return nil, err
		}
	}
	missing := minus(ids, found)
	if len(missing) > 0 && !req.Lenient {
		return nil, kiln.Invalid("patient", "patient %s does not exist (send Prefer: handling=lenient to export those that do)", refs("Patient", missing))
	}
	// Lenient: what exists is exported, and each missing id is an error-file line.
	for _, id := range missing {
		req.Warnings = append(req.Warnings, kiln.Issue{Expression: "patient", Message: fmt.Sprintf("Patient/%s does not exist; skipped", id)})
	}
	return found, nil
}

// visible keeps the ids of typ whose current version carries one of the
// tenants' access codes.
func (s *Service) visible(ctx context.Context, typ string, ids, tenants []string) ([]string, error) {
	var out []string
	for start := 0; start < len(ids); start += 500 {
		chunk := ids[start:min(start+500, len(ids))]
		q := kiln.SearchQuery{Type: typ, IDs: chunk, AccessCodes: tenants, Count: len(chunk)}
		for {
			page, err := s.store.Search(ctx, q)
			if err != nil {
				return nil, err
			}
			for _, r := range page.Resources {
				out = append(out, r.ID)
			}
			if page.Next == 0 {
				break
			}
			q.After = page.Next
		}
	}
	slices.Sort(out)
	return out, nil
}

func (s *Service) groupPatients(ctx context.Context, snap time.Time, req *kiln.ExportRequest) ([]string, error) {
	// The Group's membership is Group data: the token must read the type.
	if !req.Reads("Group") {
		return nil, kiln.Errorf(kiln.EFORBIDDEN, "the token's scopes do not allow reading Group, whose members a Group-level export uses")
	}
	g, err := s.store.Read(ctx, "Group", req.GroupID)
	if err != nil {
		if c := kiln.ErrorCode(err); c == kiln.ENOTFOUND || c == kiln.EGONE {
			return nil, &kiln.Error{Code: kiln.ENOTFOUND, Message: fmt.Sprintf("Group/%s does not exist", req.GroupID)}
		}
		return nil, err
	}
	var group struct {
		Meta struct {
			Security []struct{ System, Code string }
		}
		Member []struct {
			Entity struct {
				Reference string `json:"reference"`
			} `json:"entity"`
			Inactive bool `json:"inactive"`
		} `json:"member"`
	}
	if err := json.Unmarshal(g.Body, &group); err != nil {
		return nil, fmt.Errorf("decode Group/%s: %w", req.GroupID, err)
	}
	visible := true
	if req.Tenants != nil {
		visible = false
		for _, sec := range group.Meta.Security {
			if sec.System == kiln.AccessSystem && slices.Contains(req.Tenants, sec.Code) {
				visible = true
			}
		}
	}
	if scoped := req.ScopeFilters["Group"]; visible && scoped != nil {
		// Under query-filtered Group scopes, one of the filters must match it.
		qs, err := compileFilters("Group", scoped)
		if err != nil {
			return nil, err
		}
		m, err := fhir.DecodeJSON(g.Body)
		if err != nil {
			return nil, fmt.Errorf("decode Group/%s: %w", req.GroupID, err)
		}
		visible = fhir.MatchAny(qs, m)
	}
	if !visible {
		return nil, &kiln.Error{Code: kiln.ENOTFOUND, Message: fmt.Sprintf("Group/%s does not exist", req.GroupID)}
	}
	var members []string
	for _, m := range group.Member {
		ref, ok := fhir.ParseReference(m.Entity.Reference, s.cfg.Ref)
		if m.Inactive || !ok || ref.Type != "Patient" {
			continue
		}
		members = append(members, ref.ID)
	}
	members = uniqSorted(members)
	if len(req.Patients) > 0 {
		ids := uniqSorted(req.Patients)
		out := minus(ids, members)
		if len(out) > 0 && !req.Lenient {
			return nil, kiln.Invalid("patient", "patient %s is not an active member of Group/%s (send Prefer: handling=lenient to export the members among them)", refs("Patient", out), req.GroupID)
		}
		// Lenient: the members among them are exported, each other id is an error-file line.
		for _, id := range out {
			req.Warnings = append(req.Warnings, kiln.Issue{Expression: "patient", Message: fmt.Sprintf("Patient/%s is not an active member of Group/%s; skipped", id, req.GroupID)})
		}
		members = minus(ids, out)
	}
	found, err := s.store.PatientsAt(ctx, snap, members)
	if err != nil {
		return nil, err
	}
	if req.Tenants != nil {
		// A member of another tenant "does not exist" either: the error
		// file must not tell which ids are in use elsewhere.
		if found, err = s.visible(ctx, "Patient", found, req.Tenants); err != nil {
			return nil, err
		}
	}
	for _, id := range minus(members, found) {
		req.Warnings = append(req.Warnings, kiln.Issue{Expression: "Group/" + req.GroupID, Message: fmt.Sprintf("member Patient/%s does not exist; skipped", id)})
	}
	return found, nil
}

// plan cuts the job into units.
func (s *Service) plan(ctx context.Context, job *kiln.Job, present []string, patients int) ([]kiln.Unit, error) {
	req := &job.Request
	d := fhir.R4()
	types := present
	if req.TypesAsked() {
		types = nil
		for _, t := range req.Types {
			if slices.Contains(present, t) {
				types = append(types, t)
			}
		}
	}
	if req.ReadTypes != nil {
		n := len(types)
		types = slices.DeleteFunc(slices.Clone(types), func(t string) bool { return !req.Reads(t) })
		if !req.TypesAsked() && len(types) < n {
			// Named _type entries the token cannot read are reported one by
			// one at kick-off; here the client asked for everything, so say
			// that the scopes cut it down (without naming what it may not see).
			req.Warnings = append(req.Warnings, kiln.Issue{Expression: "scope",
				Message: "only the resource types the token's scopes allow are exported; data of other types exists and was left out"})
		}
	}
	var units []kiln.Unit
	add := func(u kiln.Unit) {
		u.Job, u.Seq = job.ID, len(units)
		units = append(units, u)
	}
	assoc := planAssociated(req)
	// The error file first: it is known now, and partial manifest pages,
	// which all list it, can start as soon as it is written.
	if len(req.Warnings) > 0 {
		add(kiln.Unit{Kind: kiln.UnitErrors})
	}
	var exported []string
	switch req.Level {
	case kiln.LevelSystem:
		exported = types
		for _, t := range types {
			bounds, err := s.store.SplitType(ctx, t, job.TransactionTime, s.cfg.UnitSize)
			if err != nil {
				return nil, err
			}
			from := kiln.Cursor{}
			for _, b := range bounds {
				add(kiln.Unit{Kind: kiln.UnitType, Type: t, From: from, To: b})
				from = b
			}
			add(kiln.Unit{Kind: kiln.UnitType, Type: t, From: from})
		}
	default:
		var comp, supp []string
		for _, t := range types {
			if d.InCompartment(t) {
				comp = append(comp, t)
			} else {
				supp = append(supp, t)
			}
		}
		exported = types
		if req.OrganizeOutputBy != "" {
			// Blocks hold the compartment only, the patient first.
			supp, exported = nil, comp
			if i := slices.Index(comp, "Patient"); i > 0 {
				comp = slices.Concat([]string{"Patient"}, slices.Delete(slices.Clone(comp), i, i+1))
			}
		}
		if patients > 0 && len(comp) > 0 {
			b := req.PatientReferenceBatchSize
			for lo := 0; lo < patients; lo += b {
				add(kiln.Unit{Kind: kiln.UnitPatients, Types: comp, PatientLo: lo, PatientHi: min(lo+b, patients) - 1})
			}
		}
		if patients > 0 {
			for _, t := range supp {
				add(kiln.Unit{Kind: kiln.UnitSupporting, Type: t})
			}
		}
	}
	if assoc && len(exported) > 0 && slices.Contains(present, "Provenance") && (req.Level == kiln.LevelSystem || patients > 0) && !allProvenance(req, exported) {
		add(kiln.Unit{Kind: kiln.UnitAssociated, Type: "Provenance", Types: exported, PatientHi: patients - 1})
	}
	if req.Since != nil && len(req.Views) == 0 {
		dt := exported
		if req.TypesAsked() {
			dt = req.Types
		}
		dt = slices.DeleteFunc(slices.Clone(dt), func(t string) bool { return !req.Reads(t) })
		if len(dt) > 0 {
			add(kiln.Unit{Kind: kiln.UnitDeleted, Types: dt})
		}
	}
	return units, nil
}

// launch starts a job's workers once; failures leave it pending for relaunch.
func (s *Service) launch(ctx context.Context, id string) {
	s.mu.Lock()
	if s.launching == nil {
		s.launching = map[string]bool{}
	}
	busy := s.launching[id]
	s.launching[id] = true
	s.mu.Unlock()
	if busy {
		return // the launch under way answers for it; relaunch retries if it fails
	}
	defer func() {
		s.mu.Lock()
		delete(s.launching, id)
		s.mu.Unlock()
	}()
	j, err := s.jobs.UpdateJob(ctx, id, func(j *kiln.Job) error {
		if j.Finished() || !j.LaunchPending {
			return errJobGone
		}
		j.Launches++
		return nil
	})
	if err != nil {
		return
	}
	if j.Launches > s.cfg.MaxLaunches {
		s.failJob(id, &kiln.Unit{Job: id}, kiln.Errorf(kiln.EINVALID, "its workers could not be started after %d attempts", s.cfg.MaxLaunches))
		return
	}
	err = s.cfg.Launcher.Launch(ctx, j)
	if err != nil {
		if kiln.ErrorCode(err) == kiln.EFORBIDDEN {
			// A missing permission does not pass: say so on the export now,
			// rather than after every launch attempt is spent.
			s.failJob(id, &kiln.Unit{Job: id}, err)
			return
		}
		if kiln.ErrorCode(err) == kiln.ETHROTTLED {
			// A quota: no attempt spent; try again later.
			s.jobs.UpdateJob(ctx, id, func(j *kiln.Job) error { j.Launches--; return nil })
		}
		s.log.Warn("export workers not started; will retry", "job", id, "launch", j.Launches, "err", err)
		return
	}
	s.jobs.UpdateJob(ctx, id, func(j *kiln.Job) error { j.LaunchPending = false; return nil })
	s.log.Info("export workers started", "job", id, "launch", j.Launches)
}

// relaunch retries pending launches.
func (s *Service) relaunch(ctx context.Context) {
	every(ctx, s.cfg.RelaunchEvery, func() bool {
		jobs, err := s.jobs.Jobs(ctx, kiln.JobAccepted, kiln.JobInProgress)
		if err != nil {
			return true
		}
		for _, j := range jobs {
			if j.LaunchPending {
				s.launch(ctx, j.ID)
			}
		}
		return true
	})
}

// every calls fn each period until ctx ends or fn returns false.
func every(ctx context.Context, period time.Duration, fn func() bool) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !fn() {
			return
		}
	}
}

// onLaunchEvent reacts to the end of a job's launched workers: a failed or
// vanished launch is relaunched (up to MaxLaunches) or fails the export; a
// finished one completes it if its units are done.
func (s *Service) onLaunchEvent(ctx context.Context, ev kiln.LaunchEvent) {
	j, err := s.jobs.GetJob(ctx, ev.Job)
	if err != nil || j.Finished() || ev.Launch != j.Launches || j.LaunchPending {
		return
	}
	total, done, err := s.jobs.UnitCounts(ctx, j.ID)
	if err != nil {
		return
	}
	if total == done {
		if err := s.finalize(ctx, j.ID); err != nil {
			s.log.Error("finish export", "job", j.ID, "err", err)
		}
		return
	}
	if ev.Outcome != "succeeded" && j.Launches >= s.cfg.MaxLaunches {
		s.failJob(j.ID, &kiln.Unit{Job: j.ID}, kiln.Errorf(kiln.EINVALID, "its worker Job %s: %s", ev.Outcome, ev.Reason))
		return
	}
	s.log.Warn("export workers ended with units left; relaunching", "job", j.ID, "outcome", ev.Outcome, "reason", ev.Reason)
	s.jobs.UpdateJob(ctx, j.ID, func(j *kiln.Job) error { j.LaunchPending = true; return nil })
	s.launch(ctx, j.ID)
}

// reclaim hands units whose worker stopped heart-beating (a killed process,
// a lost pod) back to pending, so another worker redoes them.
func (s *Service) reclaim(ctx context.Context) {
	every(ctx, max(s.cfg.Lease/4, 100*time.Millisecond), func() bool {
		s.maintained.Add(1)
		n, err := s.jobs.ReleaseExpired(ctx)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Error("reclaim expired export units", "err", err)
			}
			return true
		}
		if n > 0 {
			s.log.Warn("export units reclaimed from workers that stopped", "units", n)
			s.poke()
		}
		return true
	})
}

// heartbeat keeps a unit's lease while it runs. When the claim is lost the
// unit stops, and whoever holds it now does the work; when the job is gone
// (cancelled or failed in any process) the unit stops too, which is how a
// cancel reaches units running in other processes. Errors count toward
// losing the claim: once no heartbeat has succeeded for a whole lease, the
// store has (or may have) given the unit to another worker, so this one stops.
func (s *Service) heartbeat(ctx context.Context, u *kiln.Unit, lost, gone func()) {
	last := s.cfg.Now()
	every(ctx, max(s.cfg.Lease/3, 50*time.Millisecond), func() bool {
		c, err := s.jobs.HeartbeatUnit(ctx, u, s.cfg.Lease)
		if err != nil {
			if ctx.Err() != nil {
				return false
			}
			s.log.Warn("export unit heartbeat failed", "job", u.Job, "unit", u.Seq, "err", err)
			if s.cfg.Now().Sub(last) >= s.cfg.Lease {
				s.log.Warn("export unit heartbeats failed for a whole lease; giving the unit up", "job", u.Job, "unit", u.Seq)
				lost()
				return false
			}
			return true
		}
		switch c {
		case kiln.ClaimHeld:
			last = s.cfg.Now()
			return true
		case kiln.ClaimGone:
			gone()
		default:
			lost()
		}
		return false
	})
}

// recover finishes the running jobs whose units are all done. One job that
// cannot be finished does not hold up the others: their errors are joined.
func (s *Service) recover(ctx context.Context) error {
	jobs, err := s.jobs.Jobs(ctx, kiln.JobAccepted, kiln.JobInProgress)
	if err != nil {
		return err
	}
	var errs []error
	for _, j := range jobs {
		if ctx.Err() != nil {
			break
		}
		total, done, err := s.jobs.UnitCounts(ctx, j.ID)
		if err == nil && total == done {
			err = s.finalize(ctx, j.ID)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("export %s: %w", j.ID, err))
		}
	}
	return errors.Join(errs...)
}

func (s *Service) work(ctx context.Context, worker int) {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for ctx.Err() == nil {
		u, err := s.jobs.ClaimUnit(ctx, s.cfg.Lease)
		if err != nil {
			switch {
			case ctx.Err() != nil:
			case s.transient(err):
				s.log.Warn("claim export unit: the store is unavailable", "err", err)
			default:
				s.log.Error("claim export unit", "err", err)
			}
			u = nil
		}
		if u == nil {
			select {
			case <-ctx.Done():
			case <-s.wake:
			case <-tick.C:
			}
			continue
		}
		// Another idle worker may find more.
		s.poke()
		if !s.runUnit(ctx, u, worker) {
			// The store is briefly away (a restart): give it a moment.
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// transient reports whether err is a passing store outage: the unit is then
// handed back and redone, not failed.
func (s *Service) transient(err error) bool {
	return kiln.Transient(s.jobs, err) || kiln.Transient(s.store, err)
}

// handBack returns a unit to pending after a transient failure. If the store
// is still away this fails too, and the unit's lease running out does the same.
func (s *Service) handBack(u *kiln.Unit, cause error) {
	s.log.Warn("export unit handed back: the store is unavailable", "job", u.Job, "unit", u.Seq, "err", cause)
	if err := s.jobs.ReleaseUnit(context.Background(), u); err != nil {
		s.log.Warn("hand back export unit; its lease will run out instead", "job", u.Job, "unit", u.Seq, "err", err)
	}
}

func (s *Service) register(u *kiln.Unit, cancel context.CancelFunc) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.running[u.Job]
	if m == nil {
		m = map[int]context.CancelFunc{}
		s.running[u.Job] = m
	}
	m[u.Seq] = cancel
}

func (s *Service) unregister(u *kiln.Unit) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.running[u.Job], u.Seq)
	if len(s.running[u.Job]) == 0 {
		delete(s.running, u.Job)
	}
	s.unitsDone.Broadcast()
}

var (
	errJobGone   = errors.New("job was cancelled")
	errLeaseLost = errors.New("unit lease lost")
)

// runUnit runs one claimed unit to its end; false when it stopped on a
// transient store error (the unit is handed back).
func (s *Service) runUnit(parent context.Context, u *kiln.Unit, worker int) bool {
	ctx, cancel := context.WithCancelCause(parent)
	s.register(u, func() { cancel(errJobGone) })
	defer func() {
		cancel(nil)
		s.unregister(u)
	}()
	go s.heartbeat(ctx, u, func() { cancel(errLeaseLost) }, func() { cancel(errJobGone) })
	// Registered first, then checked: a Cancel either sees this unit running
	// (and waits for it) or has already marked the job, which is seen here.
	job, err := s.jobs.GetJob(ctx, u.Job)
	if err != nil {
		if s.transient(err) {
			s.handBack(u, err)
			return false
		}
		if kiln.ErrorCode(err) != kiln.ENOTFOUND {
			s.log.Error("export unit without job", "job", u.Job, "unit", u.Seq, "err", err)
		}
		return true
	}
	if job.Finished() {
		return true
	}
	if job.State == kiln.JobAccepted {
		if _, err := s.jobs.UpdateJob(ctx, job.ID, func(j *kiln.Job) error {
			if j.State == kiln.JobAccepted {
				j.State = kiln.JobInProgress
			}
			return nil
		}); err != nil {
			s.log.Error("mark export in progress", "job", job.ID, "err", err)
		}
	}
	start := time.Now()
	s.cfg.Metrics.Unit("claimed")
	if u.Attempts > 1 {
		s.cfg.Metrics.Unit("redone")
	}
	sink, err := s.sinkOf(job)
	if err != nil {
		s.failJob(job.ID, u, err)
		return true
	}
	prefix := unitPrefix(u)
	// Leftovers of this very attempt (none, unless the sink replays) go
	// first; earlier attempts' files are not touched here, since the claim
	// may already have moved on to a newer attempt in another process.
	if err := sink.RemovePrefix(ctx, u.Job, prefix); err != nil {
		s.failJob(job.ID, u, err)
		return true
	}
	parts, err := s.execute(ctx, job, u, sink)
	if err != nil {
		switch context.Cause(ctx) {
		case errJobGone:
			// Cancelled (here or in another process, which removed the
			// job's files already): this attempt's files, written since,
			// go too.
			_ = sink.RemovePrefix(context.Background(), u.Job, prefix)
			return true
		case errLeaseLost:
			// Another worker has the unit now and starts it from scratch.
			s.log.Warn("export unit lease lost; left to its new worker", "job", u.Job, "unit", u.Seq)
			return true
		}
		if parent.Err() != nil {
			// Shutting down: the unit goes back to pending and is redone.
			if err := s.jobs.ReleaseUnit(context.Background(), u); err != nil {
				s.log.Error("hand back export unit", "job", u.Job, "unit", u.Seq, "err", err)
			}
			return true
		}
		if s.transient(err) {
			s.handBack(u, err)
			return false
		}
		// Its own partial files go first: on a full disk that is the space
		// the store needs to record the failure.
		_ = sink.RemovePrefix(context.Background(), u.Job, prefix)
		s.failJob(job.ID, u, err)
		return true
	}
	ok, err := s.jobs.FinishUnit(ctx, u, parts)
	if err != nil && s.transient(err) && parent.Err() == nil {
		// Not recorded (or recorded and the answer lost: then this is a no-op).
		s.handBack(u, err)
		return false
	}
	if err != nil || !ok {
		if err != nil && parent.Err() == nil {
			s.log.Error("finish export unit", "job", u.Job, "unit", u.Seq, "err", err)
		}
		if context.Cause(ctx) != errLeaseLost && err == nil {
			// The job is gone: its files go too. (After a lost lease the
			// files belong to the unit's new worker and stay.)
			_ = sink.RemovePrefix(context.Background(), u.Job, prefix)
		}
		return true
	}
	s.finished.Add(1)
	s.cfg.Metrics.UnitDone(u.Kind, parts, time.Since(start))
	var n int64
	for _, p := range parts {
		n += p.Count
	}
	s.log.Debug("export unit done", "job", u.Job, "unit", u.Seq, "kind", u.Kind, "type", u.Type, "resources", n, "worker", worker, "seconds", time.Since(start).Seconds())
	total, done, err := s.jobs.UnitCounts(ctx, u.Job)
	if err != nil {
		// The 5-second recover pass in Run finishes the job later.
		s.log.Error("count export units", "job", u.Job, "err", err)
		return true
	}
	if done == total {
		if err := s.finalize(ctx, u.Job); err != nil {
			s.log.Error("finish export", "job", u.Job, "err", err)
		}
	}
	return true
}

// unitPrefix names the files of one attempt (claim) of a unit: the attempt
// number is the unit's fencing token, so a worker whose claim went stale
// without it noticing can only write or remove its own attempt's files,
// never those of the unit's current owner. Finalize lists exactly the parts
// the finishing attempt recorded, so files of abandoned attempts are never
// served (they go with the job's other files).
func unitPrefix(u *kiln.Unit) string { return fmt.Sprintf("%06d-a%d-", u.Seq, u.Attempts) }

// failJob marks the job failed and reclaims its space: a failed export never
// shows a partial manifest.
func (s *Service) failJob(id string, u *kiln.Unit, cause error) {
	ctx := context.Background()
	s.cfg.Metrics.Unit("failed")
	s.log.Error("export failed", "job", id, "unit", u.Seq, "kind", u.Kind, "type", u.Type, "err", cause)
	msg := "export failed: " + kiln.ErrorMessage(cause)
	if kiln.ErrorCode(cause) == kiln.EINTERNAL {
		msg = "export failed: the server could not write or read the export data (" + shortErr(cause) + ")"
	}
	j, err := s.jobs.UpdateJob(ctx, id, func(j *kiln.Job) error {
		if j.Finished() {
			return errJobGone
		}
		j.State = kiln.JobFailed
		j.Error = msg
		j.Expires = s.cfg.Now().Add(s.settings(j).Retention).UTC()
		return nil
	})
	if err != nil {
		return
	}
	s.cancelUnits(j.ID)
	s.waitForUnits(id, u)
	if err := s.removeFiles(ctx, j); err != nil {
		s.log.Error("remove failed export's files", "job", id, "err", err)
	}
}

// shortErr keeps the last, most specific part of a wrapped error (no paths or SQL).
func shortErr(err error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return msg
}

// settings are the job's stored settings; a job stored before they were
// kept gets this process's for what it lacks.
func (s *Service) settings(j *kiln.Job) kiln.JobSettings {
	set := j.Settings
	if set.MaxFileResources <= 0 {
		set.MaxFileResources = s.cfg.MaxFileResources
	}
	if set.MaxFileBytes <= 0 {
		set.MaxFileBytes = s.cfg.MaxFileBytes
	}
	if set.Retention <= 0 {
		set.Retention = s.cfg.Retention
	}
	if set.Bases == nil {
		set.Bases = s.cfg.Ref.Bases
	}
	return set
}

// refs are the reference rules of the job: its server's bases.
func (s *Service) refs(j *kiln.Job) fhir.Options {
	opt := s.cfg.Ref
	opt.Bases = s.settings(j).Bases
	return opt
}

// finalize assembles the manifest once every unit is done.
func (s *Service) finalize(ctx context.Context, id string) error {
	parts, err := s.jobs.Parts(ctx, id)
	if err != nil {
		return err
	}
	j, err := s.jobs.UpdateJob(ctx, id, func(j *kiln.Job) error {
		if j.Finished() {
			return errJobGone
		}
		set := s.settings(j)
		maxCount, maxBytes := set.MaxFileResources, set.MaxFileBytes
		if sink, err := s.sinkOf(j); err != nil {
			return err
		} else if _, ok := sink.(kiln.URLSink); ok {
			// Clients fetch from the sink: a file cannot span parts.
			maxCount, maxBytes = 1, 1
		}
		ext := "ndjson"
		switch {
		case len(j.Request.Views) > 0:
			// A view's part is a whole file (CSV header, Parquet footer).
			maxCount, maxBytes, ext = 1, 1, j.Request.ViewFormat
		case j.Request.OutputFormat == kiln.FormatParquet:
			maxCount, maxBytes, ext = 1, 1, "parquet"
		}
		j.State = kiln.JobCompleted
		j.Files = assemble(parts, maxCount, maxBytes, ext)
		if j.Request.AllowPartialManifests {
			// The pages handed out stay as they are; the rest is the last page.
			if last := pageFiles(parts, j.Pages); len(last) > 0 || len(j.Pages) == 0 {
				j.Pages = append(j.Pages, last)
			}
			j.Files = slices.Concat(j.Pages...)
		}
		j.UnitsDone = j.UnitsTotal
		j.Expires = s.cfg.Now().Add(s.settings(j).Retention).UTC()
		return nil
	})
	if errors.Is(err, errJobGone) {
		return nil
	}
	if err != nil {
		return err
	}
	s.cfg.Metrics.ExportDone(j.Updated.Sub(j.Created))
	var n int64
	for _, f := range j.Files {
		n += f.Count
	}
	s.log.Info("export completed", "job", id, "files", len(j.Files), "resources", n, "seconds", j.Updated.Sub(j.Created).Seconds())
	return nil
}

// PartialPages makes, for a running job with AllowPartialManifests, a new
// manifest page of the files written since the last page, and returns the
// job with its pages. A page is made only once the job's error file (for
// issues known at kick-off) is written, so that every page lists it.
func (s *Service) PartialPages(ctx context.Context, j *kiln.Job) (*kiln.Job, error) {
	if !j.Request.AllowPartialManifests || j.Finished() {
		return j, nil
	}
	parts, err := s.jobs.Parts(ctx, j.ID)
	if err != nil {
		return nil, err
	}
	if len(j.Request.Warnings) > 0 && !slices.ContainsFunc(parts, func(p kiln.Part) bool { return p.Kind == "error" }) {
		return j, nil
	}
	if len(pageFiles(parts, j.Pages)) == 0 {
		return j, nil
	}
	nj, err := s.jobs.UpdateJob(ctx, j.ID, func(cur *kiln.Job) error {
		if cur.Finished() {
			return nil // finalize made the last page
		}
		if page := pageFiles(parts, cur.Pages); len(page) > 0 {
			cur.Pages = append(cur.Pages, page)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return nj, nil
}

// pageFiles lists, one file per part, the parts with data that no page holds
// yet: output first, then deleted, then error, by type.
func pageFiles(parts []kiln.Part, pages [][]kiln.File) []kiln.File {
	onPage := map[string]bool{}
	for _, page := range pages {
		for _, f := range page {
			onPage[f.Name] = true
		}
	}
	var files []kiln.File
	for i, p := range parts {
		if p.Count > 0 && !onPage[p.Name] {
			f := kiln.File{Name: p.Name, Type: p.Type, Kind: p.Kind, Count: p.Count, Bytes: p.Bytes, Parts: []string{p.Name}}
			if p.Continues {
				// The unit's next part of the kind and type, finished with this one.
				if j := slices.IndexFunc(parts[i+1:], func(n kiln.Part) bool { return n.Kind == p.Kind && n.Type == p.Type }); j >= 0 {
					f.ContinuesIn = parts[i+1+j].Name
				}
			}
			files = append(files, f)
		}
	}
	slices.SortStableFunc(files, func(a, b kiln.File) int {
		if c := kindRank(a.Kind) - kindRank(b.Kind); c != 0 {
			return c
		}
		return strings.Compare(a.Type, b.Type)
	})
	return files
}

// kindRank orders files in a manifest listing: output, deleted, error.
func kindRank(kind string) int {
	switch kind {
	case "output":
		return 0
	case "deleted":
		return 1
	}
	return 2
}

// assemble groups parts into manifest files: consecutive parts of one kind and
// type, as long as the file stays within the limits.
func assemble(parts []kiln.Part, maxCount, maxBytes int64, ext string) []kiln.File {
	type key struct{ kind, typ string }
	byKey := map[key][]kiln.Part{}
	var keys []key
	for _, p := range parts {
		if p.Count == 0 {
			continue
		}
		k := key{p.Kind, p.Type}
		if _, ok := byKey[k]; !ok {
			keys = append(keys, k)
		}
		byKey[k] = append(byKey[k], p)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].kind != keys[j].kind {
			return kindRank(keys[i].kind) < kindRank(keys[j].kind)
		}
		return keys[i].typ < keys[j].typ
	})
	var files []kiln.File
	for _, k := range keys {
		n := 0
		cur := -1
		continues := false
		for _, p := range byKey[k] {
			if cur < 0 || continues || files[cur].Count+p.Count > maxCount || files[cur].Bytes+p.Bytes > maxBytes {
				n++
				name := fmt.Sprintf("%s-%d.%s", k.typ, n, ext)
				switch {
				case k.kind == "deleted":
					name = fmt.Sprintf("deleted-%d.ndjson", n)
				case k.kind == "error":
					name = fmt.Sprintf("error-%d.ndjson", n)
				case k.typ == "":
					name = fmt.Sprintf("blocks-%d.ndjson", n) // organizeOutputBy: every type
				}
				if continues {
					files[cur].ContinuesIn = name
				}
				files = append(files, kiln.File{Name: name, Type: k.typ, Kind: k.kind})
				cur = len(files) - 1
			}
			files[cur].Count += p.Count
			files[cur].Bytes += p.Bytes
			files[cur].Parts = append(files[cur].Parts, p.Name)
			continues = p.Continues
		}
	}
	return files
}

// Job returns a job.
func (s *Service) Job(ctx context.Context, id string) (*kiln.Job, error) {
	j, err := s.jobs.GetJob(ctx, id)
	if err != nil {
		return nil, err
	}
	if j.State == kiln.JobCancelled {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "export job %s is not known", id)
	}
	return j, nil
}

// Progress returns the share of the job's units that are done, 0–100.
func (s *Service) Progress(ctx context.Context, j *kiln.Job) int {
	if j.State == kiln.JobCompleted {
		return 100
	}
	total, done, err := s.jobs.UnitCounts(ctx, j.ID)
	if err != nil || total == 0 {
		return 0
	}
	return done * 100 / total
}

func (s *Service) cancelUnits(job string) {
	s.mu.Lock()
	for _, c := range s.running[job] {
		c()
	}
	s.mu.Unlock()
}

// Cancel stops a job, waits for its running units to stop, and removes its
// files and records. Cancelling a finished job removes it the same way.
func (s *Service) Cancel(ctx context.Context, id string) error {
	j, err := s.jobs.UpdateJob(ctx, id, func(j *kiln.Job) error {
		if j.State == kiln.JobCancelled {
			return kiln.Errorf(kiln.ENOTFOUND, "export job %s is not known", id)
		}
		j.State = kiln.JobCancelled
		return nil
	})
	if err != nil {
		return err
	}
	s.cancelUnits(id)
	if s.cfg.Launcher != nil {
		if err := s.cfg.Launcher.Stop(ctx, id); err != nil {
			s.log.Warn("stop export workers", "job", id, "err", err)
		}
	}
	s.waitForUnits(id, nil)
	return s.remove(ctx, j)
}

// waitForUnits waits (up to 30 s) until no unit of the job runs here, except
// self (the failing unit that calls it).
func (s *Service) waitForUnits(id string, self *kiln.Unit) {
	s.mu.Lock()
	defer s.mu.Unlock()
	others := func() int {
		n := len(s.running[id])
		if self != nil {
			if _, ok := s.running[id][self.Seq]; ok {
				n--
			}
		}
		return n
	}
	deadline := time.Now().Add(30 * time.Second)
	for others() > 0 && time.Now().Before(deadline) {
		// Units stop at their next batch; the cond is broadcast as each ends.
		s.waitUnits(deadline)
	}
}

// waitUnits waits on the cond with a timeout. Caller holds s.mu.
func (s *Service) waitUnits(deadline time.Time) {
	t := time.AfterFunc(time.Until(deadline), func() {
		s.mu.Lock()
		s.unitsDone.Broadcast()
		s.mu.Unlock()
	})
	s.unitsDone.Wait()
	t.Stop()
}

func (s *Service) remove(ctx context.Context, j *kiln.Job) error {
	if err := s.removeFiles(ctx, j); err != nil {
		if kiln.ErrorCode(err) != kiln.EINVALID {
			return err // passing (a sink away for a moment): the next sweep retries
		}
		// A location this process cannot open (the sink was changed since):
		// the record goes, and the operator is told where the files are.
		s.log.Error("export removed, but its files are at a location this server cannot reach", "job", j.ID, "location", j.Settings.Sink, "err", err)
	}
	return s.jobs.DeleteJob(ctx, j.ID)
}

func (s *Service) removeFiles(ctx context.Context, j *kiln.Job) error {
	sink, err := s.sinkOf(j)
	if err != nil {
		return err
	}
	return sink.RemoveJob(ctx, j.ID)
}

// sinkOf is the sink holding the job's files: this process's own, or, for
// a job accepted with another location (JobSettings.Sink), the same kind of
// sink opened there. A job with no location, or a sink that cannot name
// one (a wrapper, say), is on this process's sink as configured.
func (s *Service) sinkOf(j *kiln.Job) (kiln.Sink, error) {
	loc := j.Settings.Sink
	ls, located := s.sink.(kiln.LocatedSink)
	if loc == "" || !located || ls.Location() == loc {
		return s.sink, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if sk := s.sinks[loc]; sk != nil {
		return sk, nil
	}
	sk, err := ls.At(loc)
	if err != nil {
		return nil, fmt.Errorf("the export's files are at %s: %w", loc, err)
	}
	s.sinks[loc] = sk
	return sk, nil
}

func (s *Service) sweep(ctx context.Context) {
	every(ctx, s.cfg.SweepEvery, func() bool {
		if err := s.Sweep(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("sweep expired exports", "err", err)
		}
		return true
	})
}

// Sweep removes jobs past their expiry and leftovers of cancelled ones.
func (s *Service) Sweep(ctx context.Context) error {
	jobs, err := s.jobs.Jobs(ctx, kiln.JobCompleted, kiln.JobFailed, kiln.JobCancelled)
	if err != nil {
		return err
	}
	now := s.cfg.Now()
	var errs []error
	for _, j := range jobs {
		if j.State == kiln.JobCancelled || (!j.Expires.IsZero() && now.After(j.Expires)) {
			s.mu.Lock()
			busy := len(s.running[j.ID]) > 0
			s.mu.Unlock()
			if busy {
				continue
			}
			if err := s.remove(ctx, j); err != nil {
				// One job that cannot go must not keep the others.
				errs = append(errs, fmt.Errorf("remove export %s: %w", j.ID, err))
				continue
			}
			s.log.Info("export removed", "job", j.ID, "state", j.State)
		}
	}
	return errors.Join(errs...)
}

// FileURL returns where a client downloads a manifest file, when the sink
// serves files itself (ok false: Kiln's own file endpoint serves it).
func (s *Service) FileURL(ctx context.Context, j *kiln.Job, f *kiln.File) (url string, ok bool, err error) {
	sink, err := s.sinkOf(j)
	if err != nil {
		return "", false, err
	}
	us, isURL := sink.(kiln.URLSink)
	if !isURL || len(f.Parts) != 1 {
		return "", false, nil
	}
	u, err := us.URL(ctx, j.ID, f.Parts[0])
	return u, err == nil, err
}

// OpenFile opens a manifest file of a job (completed, or on a partial
// manifest page): its parts in order.
func (s *Service) OpenFile(ctx context.Context, j *kiln.Job, name string) (io.ReadCloser, *kiln.File, error) {
	for _, files := range append([][]kiln.File{j.Files}, j.Pages...) {
		for i := range files {
			f := &files[i]
			if f.Name == name {
				sink, err := s.sinkOf(j)
				if err != nil {
					return nil, nil, err
				}
				return &multiPart{ctx: ctx, sink: sink, job: j.ID, parts: f.Parts}, f, nil
			}
		}
	}
	return nil, nil, kiln.Errorf(kiln.ENOTFOUND, "export job %s has no file %s", j.ID, name)
}

// multiPart reads parts one after another, opening each only when reached.
type multiPart struct {
	ctx   context.Context
	sink  kiln.Sink
	job   string
	parts []string
	cur   io.ReadCloser
}

func (m *multiPart) Read(p []byte) (int, error) {
	for {
		if m.cur == nil {
			if len(m.parts) == 0 {
				return 0, io.EOF
			}
			r, err := m.sink.Open(m.ctx, m.job, m.parts[0])
			if err != nil {
				return 0, err
			}
			m.cur, m.parts = r, m.parts[1:]
		}
		n, err := m.cur.Read(p)
		if errors.Is(err, io.EOF) {
			m.cur.Close()
			m.cur = nil
			if n > 0 {
				return n, nil
			}
			continue
		}
		return n, err
	}
}

func (m *multiPart) Close() error {
	if m.cur != nil {
		return m.cur.Close()
	}
	return nil
}

func uniqSorted(s []string) []string {
	out := slices.Clone(s)
	sort.Strings(out)
	return slices.Compact(out)
}

// minus returns the elements of a (sorted) not in b (sorted).
func minus(a, b []string) []string {
	var out []string
	for _, x := range a {
		if _, ok := slices.BinarySearch(b, x); !ok {
			out = append(out, x)
		}
	}
	return out
}

func refs(typ string, ids []string) string {
	const show = 5
	var parts []string
	for i, id := range ids {
		if i == show {
			parts = append(parts, fmt.Sprintf("and %d more", len(ids)-show))
			break
		}
		parts = append(parts, typ+"/"+id)
	}
	return strings.Join(parts, ", ")
}
