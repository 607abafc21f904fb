package kiln

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"
)

// AccessSystem is the meta.security coding system whose codes name the tenants
// that may see a record; access/<code>.read scopes select by it.
const AccessSystem = "https://www.icanbwell.com/access"

// AccessCodesOf returns the AccessSystem codes in a resource body's
// meta.security: the tenants of that version.
func AccessCodesOf(body []byte) []string {
	var m struct {
		Meta struct {
			Security []struct{ System, Code string }
		}
	}
	json.Unmarshal(body, &m) // a stored body is valid JSON; anything else has no codes
	var out []string
	for _, s := range m.Meta.Security {
		if s.System == AccessSystem {
			out = append(out, s.Code)
		}
	}
	return out
}

// TaggedFor reports whether a resource version belongs to one of the
// tenants codes (nil: no tenant filter). Stores use it on versions whose
// tags the access index does not hold: the index follows the current version.
func TaggedFor(codes []string, body []byte) bool {
	if codes == nil {
		return true
	}
	for _, c := range AccessCodesOf(body) {
		if slices.Contains(codes, c) {
			return true
		}
	}
	return false
}

// TaggedOnly wraps a scan callback so that it sees only the bodies tagged
// for one of codes (nil: every body).
func TaggedOnly(codes []string, fn func([]byte) error) func([]byte) error {
	if codes == nil {
		return fn
	}
	return func(body []byte) error {
		if !TaggedFor(codes, body) {
			return nil
		}
		return fn(body)
	}
}

// Resource is one stored version of a FHIR resource.
type Resource struct {
	Type        string
	ID          string
	Version     int64
	LastUpdated time.Time
	Deleted     bool
	// Body is the compact JSON of the resource, meta.versionId and
	// meta.lastUpdated included; nil for a deletion.
	Body []byte
	// Cursor is the resource's position in search order (set by Search).
	Cursor int64
}

// Ref names a resource by type and id.
type Ref struct {
	Type string
	ID   string
}

// WriteKind says what a write does.
type WriteKind int

const (
	// Put creates the resource or makes a new version of it.
	Put WriteKind = iota
	// Create creates the resource and fails with ECONFLICT if the id is taken.
	Create
	// Delete leaves a tombstone; deleting a missing or deleted resource is a no-op.
	Delete
)

// Write is one change in an atomic batch. The fhir package fills it from a
// validated resource; stores only copy its fields into their indexes.
type Write struct {
	Kind WriteKind
	Type string
	ID   string
	// Body is the canonical compact JSON without meta.versionId and
	// meta.lastUpdated; MetaAt is the offset just inside the "meta" object
	// where the store splices those two in, and MetaEmpty says whether the
	// meta object had nothing else.
	Body      []byte
	MetaAt    int
	MetaEmpty bool
	// Hash identifies Body; a Put whose hash equals the current version's is a no-op.
	Hash []byte
	// Patients whose compartment holds this resource.
	Patients []string
	// Supporting are references to resources outside the compartment
	// (Practitioner, Organization, …): exported with these patients' data.
	Supporting []Ref
	// PatientRefs are patients referenced by a resource that is outside the
	// compartment (e.g. Device.patient): it is exported with their data.
	PatientRefs []string
	// AccessCodes are the meta.security codes of AccessSystem.
	AccessCodes []string
	// IfMatch, when non-zero, is the version the current one must have.
	IfMatch int64
}

// WriteResult tells what a write did.
type WriteResult struct {
	Resource
	Created bool
	// Unchanged is true for a Put that matched the current version, and for
	// a Delete of a missing or deleted resource.
	Unchanged bool
}

// Prior is what a store holds of a resource when a Write comes: whether a
// row exists (live or a tombstone), its version and its content hash.
type Prior struct {
	Exists, Deleted bool
	Version         int64
	Hash            []byte
}

// WriteStep is what a store must do for one Write.
type WriteStep int

const (
	StepNone   WriteStep = iota // nothing: an unchanged Put, or a Delete of what is absent
	StepDelete                  // turn the live row into a tombstone
	StepUpdate                  // replace the existing row (live or tombstone)
	StepInsert                  // add a new row
)

// Decide applies Kiln's write rules to one Write given its Prior: If-Match,
// create conflicts, deletes of nothing, and unchanged content. The result
// carries the new version (and, for StepNone, the whole answer); the store
// only performs the step. Every store calls it, so that all agree on versions
// and no-ops.
func Decide(w *Write, p Prior) (WriteStep, WriteResult, error) {
	res := WriteResult{Resource: Resource{Type: w.Type, ID: w.ID}}
	live := p.Exists && !p.Deleted
	if w.IfMatch != 0 && (!live || p.Version != w.IfMatch) {
		return StepNone, res, &Error{Code: EPRECONDITION, Message: fmt.Sprintf("%s/%s is not at version %d", w.Type, w.ID, w.IfMatch)}
	}
	switch {
	case w.Kind == Delete && !live:
		res.Unchanged, res.Deleted, res.Version = true, true, p.Version
		return StepNone, res, nil
	case w.Kind == Delete:
		res.Deleted, res.Version = true, p.Version+1
		return StepDelete, res, nil
	case w.Kind == Create && live:
		return StepNone, res, &Error{Code: ECONFLICT, Message: fmt.Sprintf("%s/%s already exists", w.Type, w.ID)}
	case live && bytes.Equal(p.Hash, w.Hash):
		res.Unchanged, res.Version = true, p.Version
		return StepNone, res, nil
	case p.Exists:
		res.Version = p.Version + 1
		return StepUpdate, res, nil
	}
	res.Version, res.Created = 1, true
	return StepInsert, res, nil
}

// SearchQuery is the minimal REST search Kiln's store answers directly.
type SearchQuery struct {
	Type string
	IDs  []string
	// Identifier matches Resource.identifier as system|value, |value or value.
	Identifier []string
	// LastUpdated bounds; zero means open.
	UpdatedAfter, UpdatedBefore time.Time
	UpdatedGE, UpdatedLE        bool
	Count                       int
	// After is the keyset cursor returned by the previous page.
	After int64
	// AccessCodes, when not nil, keeps only resources tagged with one of them.
	AccessCodes []string
	// Patients, when not nil, keeps only resources in the Patient compartment
	// of one of these patients (the compartment index: a superset of what a
	// patient-linked reference parameter matches, which the caller still checks).
	Patients []string
	// Total asks for SearchPage.Total, the number of all matches (a count
	// over them: only asked for when shown).
	Total bool
}

// SearchPage is a page of search results.
type SearchPage struct {
	Resources []Resource
	// Next is the cursor for the next page, or 0 when this is the last one.
	Next int64
	// Total is the number of all matches when SearchQuery.Total asked for it.
	Total int
}

// ResourceStore keeps resources, their history, tombstones and the indexes
// the exporter reads.
type ResourceStore interface {
	// Write applies ws atomically: all of them or none.
	Write(ctx context.Context, ws []Write) ([]WriteResult, error)
	// Read returns the current version; ENOTFOUND, or EGONE for a deleted one.
	Read(ctx context.Context, typ, id string) (*Resource, error)
	ReadVersion(ctx context.Context, typ, id string, version int64) (*Resource, error)
	// History returns every version, newest first.
	History(ctx context.Context, typ, id string) ([]Resource, error)
	Search(ctx context.Context, q SearchQuery) (*SearchPage, error)
	// Counts returns the number of current, non-deleted resources per type.
	Counts(ctx context.Context) (map[string]int64, error)
	// CompartmentOf lists the current resources in patient's compartment.
	CompartmentOf(ctx context.Context, patient string) ([]Ref, error)
	// SnapshotTime returns a time T such that every write committed so far has
	// lastUpdated ≤ T and every later write has lastUpdated > T.
	SnapshotTime(ctx context.Context) (time.Time, error)
	Close() error
}

// ScanQuery selects the resources one export work unit reads, as they were
// at Snapshot.
type ScanQuery struct {
	Type string
	// Since and Until bound meta.lastUpdated: Since < lastUpdated ≤ Until
	// (zero Since: no lower bound; Until is capped at Snapshot).
	Since, Until, Snapshot time.Time
	// For a system export: the (lastUpdated, rowid) keyset range
	// (From, To]; zero To means to the end.
	From, To Cursor
	// For a Patient or Group export: the job's patients with ordinals
	// PatientLo..PatientHi. Each resource is read by the batch holding the
	// lowest-ordinal patient whose compartment holds it, so it is written once.
	Job                  string
	PatientLo, PatientHi int
	// Supporting reads the non-compartment resources referenced by, or
	// referencing, the job's patients instead of the compartment.
	Supporting bool
	// Batch is the number of resources read per query (fetchResourceBatchSize).
	Batch int
	// AccessCodes, when not nil, keeps only resources tagged with one of them.
	AccessCodes []string
	// Patients, when not nil, keeps only resources in the Patient compartment
	// of one of these patients (the compartment index: a superset of what a
	// patient-linked reference parameter matches, which the caller still checks).
	Patients []string
	// Total asks for SearchPage.Total, the number of all matches (a count
	// over them: only asked for when shown).
	Total bool
}

// Cursor is a keyset position in a type's (lastUpdated, rowid) order.
type Cursor struct {
	LastUpdated int64
	Row         int64
}

// Deleted is a tombstone reported in a _since export.
type Deleted struct {
	Type        string
	ID          string
	LastUpdated time.Time
}

// ExportReader is what the export engine reads from a store.
type ExportReader interface {
	// Scan calls fn with the stored bytes of each selected resource, in
	// batches of q.Batch, as of q.Snapshot. The bytes are valid only during the call.
	Scan(ctx context.Context, q ScanQuery, fn func(body []byte) error) error
	// SplitType returns keyset boundaries that cut type's resources (as of
	// snapshot) into runs of about size resources.
	SplitType(ctx context.Context, typ string, snapshot time.Time, size int) ([]Cursor, error)
	// Deletions lists tombstones with since < deletion ≤ until of the given
	// types; with job set, only those in the job's patients' compartments;
	// with codes not nil, only those tagged with one of them.
	Deletions(ctx context.Context, types []string, since, until time.Time, job string, codes []string, fn func(Deleted) error) error
	// PatientsAt lists the ids of patients that existed at snapshot, among ids (all when nil).
	PatientsAt(ctx context.Context, snapshot time.Time, ids []string) ([]string, error)
	// TypesPresent lists the types that have any resource.
	TypesPresent(ctx context.Context) ([]string, error)
	// JobPatients lists the ids of a job's patients with ordinals lo to hi
	// (inclusive), in ordinal order.
	JobPatients(ctx context.Context, job string, lo, hi int) ([]string, error)
}
