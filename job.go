package kiln

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"time"
)

// JobState is an export job's status; the values are the X-Progress words Helix clients know.
type JobState string

const (
	JobAccepted   JobState = "accepted"
	JobInProgress JobState = "in-progress"
	JobCompleted  JobState = "completed"
	JobFailed     JobState = "entered-in-error"
	JobCancelled  JobState = "cancelled"
)

// Export output formats (_outputFormat).
const (
	FormatNDJSON  = "application/fhir+ndjson"
	FormatParquet = "application/vnd.apache.parquet"
)

// Export levels.
const (
	LevelSystem  = "system"
	LevelPatient = "patient"
	LevelGroup   = "group"
)

// ExportRequest is a validated kick-off, stored with its job: what the
// client asked, what its token grants, and Helix's job hints, each in its own
// part, so that each parameter is handled in one place. One convention for
// "unset" holds throughout: a nil slice, map or pointer is unset (nothing
// asked, no limit); an empty non-nil slice is a limit that admits nothing.
// Strings and numbers get their defaults at kick-off, so their zero values
// are never read as choices. Types, ReadTypes and Tenants keep that
// distinction in JSON (null or []), so they have no omitempty.
type ExportRequest struct {
	ExportAsk
	ExportGrant
	JobHints
	// Warnings are problems ignored under Prefer: handling=lenient, and
	// statements of what was left out; each becomes an OperationOutcome line
	// in the error file.
	Warnings []Issue `json:"warnings,omitempty"`
}

// ExportAsk is what the client asked for (the Bulk Data parameters).
type ExportAsk struct {
	Level   string `json:"level"`
	GroupID string `json:"groupId,omitempty"`
	// RequestURL is the kick-off URL as the client sent it (for the manifest).
	RequestURL string `json:"request"`
	// Types is the _type list: nil when _type was not sent (every type the
	// token reads); empty when none of its types is left (nothing is exported).
	Types    []string   `json:"types"`
	Since    *time.Time `json:"since,omitempty"`
	Until    *time.Time `json:"until,omitempty"`
	Patients []string   `json:"patients,omitempty"`
	// TypeFilters holds the _typeFilter queries per type ("category=laboratory");
	// several for one type are ORed.
	TypeFilters map[string][]string `json:"typeFilters,omitempty"`
	// Elements holds _elements as given: "element" or "Type.element".
	Elements     []string `json:"elements,omitempty"`
	OutputFormat string   `json:"outputFormat"`
	// IncludeAssociatedData holds LatestProvenanceResources and/or
	// RelevantProvenanceResources: the export adds the Provenance whose
	// target is an exported resource (all of them, or the newest per target).
	IncludeAssociatedData []string `json:"includeAssociatedData,omitempty"`
	// OrganizeOutputBy is "Patient" for Bulk Data v3 resource blocks: each
	// patient's data after a Parameters header naming the patient.
	OrganizeOutputBy string `json:"organizeOutputBy,omitempty"`
	Lenient          bool   `json:"lenient,omitempty"`
	// AllowPartialManifests (Bulk Data v3): while the export runs, the status
	// answers with manifest pages of the files already written.
	AllowPartialManifests bool `json:"allowPartialManifests,omitempty"`
	// Views makes the job a $viewdefinition-export (SQL on FHIR): it writes
	// the rows of each view over the resources of its type, in ViewFormat,
	// instead of the resources. Types are then the views' types.
	Views []ViewExport `json:"views,omitempty"`
	// ViewFormat is csv, ndjson, json or parquet (view.Formats).
	ViewFormat string `json:"viewFormat,omitempty"`
	// ViewHeader starts each CSV file with the column names.
	ViewHeader bool `json:"viewHeader,omitempty"`
	// ClientTrackingID is echoed in a view export's status.
	ClientTrackingID string `json:"clientTrackingId,omitempty"`
}

// ViewExport is one view of a $viewdefinition-export. The definition
// travels with the job, as given, and is compiled by whichever process runs
// a unit.
type ViewExport struct {
	// Name names the view's output files (the view parameter's name, else
	// the ViewDefinition's name, else view_<n>).
	Name       string          `json:"name"`
	Resource   string          `json:"resource"`
	Definition json.RawMessage `json:"definition"`
}

// TypesAsked reports whether the client sent _type.
func (a *ExportAsk) TypesAsked() bool { return a.Types != nil }

// ExportGrant is what the client's token lets the export read; it narrows
// the ask and is kept for the job's whole run.
type ExportGrant struct {
	// ReadTypes: nil when the token reads every type, else the types it reads.
	ReadTypes []string `json:"readTypes"`
	// Tenants: nil for no tenant limit, else the access/ codes a record must
	// carry one of (empty: none is visible).
	Tenants []string `json:"tenants"`
	// ScopeFilters holds, per type, the query filters of the token's SMART v2
	// scopes: a resource of the type is exported only when it matches one of
	// them (and one of its TypeFilters, if any). Deletions of such types are
	// not reported: a tombstone cannot be matched.
	ScopeFilters map[string][]string `json:"scopeFilters,omitempty"`
}

// Reads reports whether the grant reads typ.
func (g *ExportGrant) Reads(typ string) bool {
	return g.ReadTypes == nil || slices.Contains(g.ReadTypes, typ)
}

// JobHints are Helix's job parameters: batch sizes, and what the
// Kubernetes launcher gives the job's pods.
type JobHints struct {
	PatientReferenceBatchSize int    `json:"patientReferenceBatchSize"`
	FetchResourceBatchSize    int    `json:"fetchResourceBatchSize"`
	UploadPartSize            int64  `json:"uploadPartSize"`
	LogLevel                  string `json:"loglevel,omitempty"`
	RequestsMemory            string `json:"requestsMemory,omitempty"`
	LimitsMemory              string `json:"limitsMemory,omitempty"`
	RAM                       string `json:"ram,omitempty"`
	TTLSecondsAfterFinished   *int   `json:"ttlSecondsAfterFinished,omitempty"`
}

// UnmarshalJSON reads requests stored before the convention above, when
// flags said whether _type was sent and whether types and tenants were
// limited, and an empty list was left out of the JSON: such a limit must
// not come back as "no limit".
func (r *ExportRequest) UnmarshalJSON(b []byte) error {
	type plain ExportRequest
	var v struct {
		plain
		TypesGiven   bool `json:"typesGiven"`
		LimitTypes   bool `json:"limitTypes"`
		LimitTenants bool `json:"limitTenants"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*r = ExportRequest(v.plain)
	if v.TypesGiven && r.Types == nil {
		r.Types = []string{}
	}
	if v.LimitTypes && r.ReadTypes == nil {
		r.ReadTypes = []string{}
	}
	if v.LimitTenants && r.Tenants == nil {
		r.Tenants = []string{}
	}
	return nil
}

// Job is an export job as stored.
type Job struct {
	ID              string        `json:"id"`
	Owner           string        `json:"owner"`
	State           JobState      `json:"state"`
	Request         ExportRequest `json:"request"`
	TransactionTime time.Time     `json:"transactionTime"`
	Created         time.Time     `json:"created"`
	Updated         time.Time     `json:"updated"`
	// Expires is when a finished job's files are removed.
	Expires    time.Time `json:"expires,omitzero"`
	Error      string    `json:"error,omitempty"`
	UnitsTotal int       `json:"unitsTotal"`
	UnitsDone  int       `json:"unitsDone"`
	// Patients is the number of patients a Patient or Group export covers.
	Patients int `json:"patients,omitempty"`
	// Files are the manifest's files, set when the job completes.
	Files []File `json:"files,omitempty"`
	// Pages, with AllowPartialManifests, are the manifest pages handed out so
	// far: each holds the files of units finished when it was made (one file
	// per part) and never changes afterwards. Files is all pages in order.
	Pages [][]File `json:"pages,omitempty"`
	// Launches counts how often a Launcher started the job's workers.
	Launches int `json:"launches,omitempty"`
	// LaunchPending is true while the job waits to be launched (or relaunched).
	LaunchPending bool `json:"launchPending,omitempty"`
	// Settings are the kick-off server's settings the job runs with.
	Settings JobSettings `json:"settings,omitzero"`
}

// JobSettings are the server settings an export runs with, fixed at
// kick-off and stored with the job, so that whichever process runs a unit
// or finishes the job — a kiln worker with its own flags, say — does it as
// the server that accepted it would have.
type JobSettings struct {
	// MaxFileResources and MaxFileBytes are the file limits.
	MaxFileResources int64 `json:"maxFileResources,omitempty"`
	MaxFileBytes     int64 `json:"maxFileBytes,omitempty"`
	// Retention is how long the finished job's files are kept.
	Retention time.Duration `json:"retention,omitempty"`
	// Bases are the server's own base URLs: absolute references under them
	// are to this server's resources.
	Bases []string `json:"bases,omitempty"`
	// Sink is where the job's files are (a LocatedSink's Location, e.g.
	// s3://bucket/prefix): a worker whose sink flags point elsewhere writes
	// them there all the same, and finalize, download and removal find them.
	Sink string `json:"sink,omitempty"`
}

// File is one file of a manifest: consecutive parts of one type, served as one.
type File struct {
	Name  string   `json:"name"`
	Type  string   `json:"type"`
	Kind  string   `json:"kind"`
	Count int64    `json:"count"`
	Bytes int64    `json:"bytes"`
	Parts []string `json:"parts"`
	// ContinuesIn names the file the last resource block of this one goes
	// on in (organizeOutputBy, a block larger than the file limits).
	ContinuesIn string `json:"continuesIn,omitempty"`
}

// Finished reports whether the job will do no more work.
func (j *Job) Finished() bool {
	return j.State == JobCompleted || j.State == JobFailed || j.State == JobCancelled
}

// Unit kinds.
const (
	UnitType       = "type"       // a keyset range of one type (system export)
	UnitPatients   = "patients"   // a patient batch, all requested compartment types
	UnitSupporting = "supporting" // non-compartment resources of the job's patients, one type
	UnitDeleted    = "deleted"    // the deleted[] file of a _since export
	UnitErrors     = "errors"     // the error file (lenient warnings, refused types)
	// UnitAssociated writes the Provenance of the job's exported resources
	// (includeAssociatedData); Types are the exported types, and for a
	// Patient or Group export PatientHi is the job's last patient ordinal.
	UnitAssociated = "associated"
)

// Unit is one piece of an export, run by one worker, written to its own parts.
type Unit struct {
	Job       string   `json:"job"`
	Seq       int      `json:"seq"`
	Kind      string   `json:"kind"`
	Type      string   `json:"type,omitempty"`
	Types     []string `json:"types,omitempty"`
	From      Cursor   `json:"from"`
	To        Cursor   `json:"to"`
	PatientLo int      `json:"patientLo,omitempty"`
	PatientHi int      `json:"patientHi,omitempty"`
	Attempts  int      `json:"-"`
}

// Claim is what a heartbeat learns about a worker's claim of a unit.
type Claim int

const (
	// ClaimHeld: the claim is current and its lease was extended.
	ClaimHeld Claim = iota + 1
	// ClaimLost: the unit's lease ran out and it was released or claimed
	// anew; the worker stops and touches nothing of the newer attempt.
	ClaimLost
	// ClaimGone: the unit's job is no longer running (cancelled, failed or
	// removed); the worker stops and drops its own attempt's files.
	ClaimGone
)

func (c Claim) String() string {
	switch c {
	case ClaimHeld:
		return "held"
	case ClaimLost:
		return "lost"
	case ClaimGone:
		return "job gone"
	}
	return fmt.Sprintf("claim(%d)", int(c))
}

// Part is one file a unit wrote.
type Part struct {
	Type  string `json:"type"`
	Name  string `json:"name"`
	Count int64  `json:"count"`
	Bytes int64  `json:"bytes"`
	// Kind is "output", "deleted" or "error".
	Kind string `json:"kind"`
	// Continues is true when the part ends inside a resource block that the
	// unit's next part of the same kind and type goes on with.
	Continues bool `json:"continues,omitempty"`
}

// WriteOptions tune how a sink writes one file.
type WriteOptions struct {
	// PartSize is the multipart upload part size in bytes, where the sink uploads in parts.
	PartSize int64
}

// Sink stores export files. Names are unique within a job.
type Sink interface {
	// Create opens name for writing, replacing any earlier content; the file
	// is complete and durable once Close returns nil. A writer that also has
	// Abort() error is aborted, instead of closed, when the unit fails.
	Create(ctx context.Context, job, name string, opt WriteOptions) (io.WriteCloser, error)
	// Open reads a file; ENOTFOUND when it is missing.
	Open(ctx context.Context, job, name string) (io.ReadCloser, error)
	// RemovePrefix deletes the job's files whose names start with prefix.
	RemovePrefix(ctx context.Context, job, prefix string) error
	// RemoveJob deletes all of a job's files.
	RemoveJob(ctx context.Context, job string) error
}

// LocatedSink is a Sink that can name where its files are and open another
// place of its own kind, with the same credentials: a job keeps its files at
// the location it was accepted with (JobSettings.Sink), whatever sink
// settings the process that runs or finishes it has.
type LocatedSink interface {
	Sink
	// Location names where the files are, e.g. s3://bucket/prefix or
	// file:///var/lib/kiln/exports.
	Location() string
	// At returns the sink for a location of its kind; EINVALID for another kind.
	At(location string) (Sink, error)
}

// URLSink is a Sink whose files clients download from the sink itself (e.g.
// presigned S3 URLs) rather than through Kiln. Each part is then a file of
// its own in the manifest.
type URLSink interface {
	Sink
	// URL returns where a client downloads the file now.
	URL(ctx context.Context, job, name string) (string, error)
}

// Elector elects, among the processes sharing a store, the one that does a
// maintenance role (the export coordinator). A store without it is one
// process's alone, which then always leads.
type Elector interface {
	// Lead takes or keeps the leadership of name for holder for ttl from
	// now (on the store's clock) and reports whether holder leads.
	Lead(ctx context.Context, name, holder string, ttl time.Duration) (bool, error)
	// Resign gives the leadership of name up, if holder has it.
	Resign(ctx context.Context, name, holder string) error
}

// JobLimits caps unfinished (accepted or in-progress) jobs: all of them,
// and one owner's. Zero is no limit.
type JobLimits struct {
	All, PerOwner int
}

// LimitError says which job limit a new job would pass.
type LimitError struct {
	PerOwner bool // the owner's limit, else the store-wide one
	Running  int  // unfinished jobs counted against it
}

func (e *LimitError) Error() string {
	if e.PerOwner {
		return fmt.Sprintf("%d unfinished exports of this client, its limit", e.Running)
	}
	return fmt.Sprintf("%d unfinished exports, the server's limit", e.Running)
}

// Check returns the *LimitError for a new job of an owner with all and
// mine unfinished jobs already, or nil.
func (l JobLimits) Check(all, mine int) error {
	if l.All > 0 && all >= l.All {
		return &LimitError{Running: all}
	}
	if l.PerOwner > 0 && mine >= l.PerOwner {
		return &LimitError{PerOwner: true, Running: mine}
	}
	return nil
}

// JobStore keeps export jobs and their work units.
type JobStore interface {
	// CreateJob stores a new job and its units, unless that would take the
	// unfinished jobs past lim: then it stores nothing and returns a
	// *LimitError. The check and the insert are one transaction, so that
	// concurrent kick-offs (in any process) cannot overshoot a limit.
	CreateJob(ctx context.Context, j *Job, units []Unit, lim JobLimits) error
	// SetPatients records the job's patients in order; ordinals start at 0.
	SetPatients(ctx context.Context, job string, ids []string) error
	GetJob(ctx context.Context, id string) (*Job, error)
	// UpdateJob reads, changes and writes a job in one transaction.
	UpdateJob(ctx context.Context, id string, fn func(*Job) error) (*Job, error)
	// DeleteJob removes a job, its units and patients.
	DeleteJob(ctx context.Context, id string) error
	// Jobs lists jobs in the given states (all when none).
	Jobs(ctx context.Context, states ...JobState) ([]*Job, error)
	// ClaimUnit hands a pending unit of a running job to a worker until the
	// lease expires; nil when none is pending.
	ClaimUnit(ctx context.Context, lease time.Duration) (*Unit, error)
	// FinishUnit records a unit's parts and counts it done; it reports false
	// when this claim of the unit is no longer running (its lease ran out and
	// the unit went to another worker, or its job was removed). Attempts is
	// the fencing token: only the latest claim may finish.
	FinishUnit(ctx context.Context, u *Unit, parts []Part) (bool, error)
	// HeartbeatUnit extends a running unit's lease and tells whether this
	// claim (u.Attempts) still holds it: ClaimLost when the unit went back
	// to pending or to a newer attempt, ClaimGone when its job is no longer
	// running (cancelled, failed, removed).
	HeartbeatUnit(ctx context.Context, u *Unit, lease time.Duration) (Claim, error)
	// ReleaseUnit puts a claimed unit back to pending (it will be redone).
	ReleaseUnit(ctx context.Context, u *Unit) error
	// ReleaseExpired puts units whose lease ran out back to pending.
	ReleaseExpired(ctx context.Context) (int, error)
	// Parts lists all finished units' parts in unit order.
	Parts(ctx context.Context, job string) ([]Part, error)
	// UnitCounts returns the number of units of job in all and done.
	UnitCounts(ctx context.Context, job string) (total, done int, err error)
	// Running counts unfinished jobs, in all and of owner.
	Running(ctx context.Context, owner string) (all, mine int, err error)
}
