// Package storetest is the contract every Kiln store must meet: one suite,
// run against each store implementation (SQLite now, PostgreSQL later).
package storetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// Store is what the suite exercises.
type Store interface {
	kiln.ResourceStore
	kiln.ExportReader
	kiln.JobStore
	kiln.ClientStore
	kiln.ViewStore
	kiln.SecretStore
	kiln.Outbox
	SetEvents(kiln.Events)
	// SetClock pins the lastUpdated clock (a nil func is not allowed).
	SetClock(func() time.Time)
}

// Run runs the contract against stores made by open; each subtest gets a new, empty one.
func Run(t *testing.T, open func(t *testing.T) Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s Store)
	}{
		{"CreateReadVersions", testCreateReadVersions},
		{"NoOpUpdateKeepsVersion", testNoOpUpdate},
		{"DeleteLeavesTombstone", testDelete},
		{"CreateConflictAndIfMatch", testConflicts},
		{"BatchIsAtomic", testAtomic},
		{"LastUpdatedNeverGoesBack", testClock},
		{"CompartmentIndex", testCompartment},
		{"SearchIdentifierAndPaging", testSearch},
		{"ScanShowsSnapshot", testScanSnapshot},
		{"ScanPatientBatchesOnce", testScanPatients},
		{"ScanPatientsAsOfSnapshot", testScanPatientsAsOfSnapshot},
		{"SameResourceTwiceInABatch", testTwiceInBatch},
		{"SplitTypeCoversAll", testSplit},
		{"DeletionsInWindow", testDeletions},
		{"JobUnitsClaimedOnce", testUnits},
		{"JobLimitsHoldUnderConcurrency", testJobLimits},
		{"JobPatientsInOrder", testJobPatients},
		{"TypesPresentKeepsTombstones", testTypesPresent},
		{"ClientsStored", testClients},
		{"ViewsStored", testViews},
		{"SecretsKept", testSecrets},
		{"OutboxWithItsChange", testOutbox},
		{"AssertionsUsedOnce", testAssertions},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.fn(t, open(t)) })
	}
}

// Put builds a write from JSON text, failing the test on invalid input.
func Put(t testing.TB, body string) kiln.Write {
	t.Helper()
	p, err := fhir.Parse([]byte(body))
	if err != nil {
		t.Fatalf("parse %s: %v", body, err)
	}
	return fhir.Prepare(p, p.ID, fhir.Options{Bases: []string{"http://kiln.test/4_0_0"}})
}

func write(t testing.TB, s kiln.ResourceStore, ws ...kiln.Write) []kiln.WriteResult {
	t.Helper()
	res, err := s.Write(context.Background(), ws)
	if err != nil {
		t.Fatalf("write: %v", err)
	}
	return res
}

func patient(id string) string {
	return fmt.Sprintf(`{"resourceType":"Patient","id":%q,"name":[{"family":"F%s"}]}`, id, id)
}

func observation(id, subject string) string {
	return fmt.Sprintf(`{"resourceType":"Observation","id":%q,"status":"final","code":{"text":"x"},"subject":{"reference":"Patient/%s"}}`, id, subject)
}

func testCreateReadVersions(t *testing.T, s Store) {
	ctx := context.Background()
	res := write(t, s, Put(t, patient("p1")))
	if !res[0].Created || res[0].Version != 1 {
		t.Fatalf("first write: created=%v version=%d", res[0].Created, res[0].Version)
	}
	res = write(t, s, Put(t, `{"resourceType":"Patient","id":"p1","gender":"female"}`))
	if res[0].Created || res[0].Version != 2 {
		t.Fatalf("second write: created=%v version=%d", res[0].Created, res[0].Version)
	}
	cur, err := s.Read(ctx, "Patient", "p1")
	if err != nil {
		t.Fatal(err)
	}
	var m struct {
		Meta struct {
			VersionID   string `json:"versionId"`
			LastUpdated string `json:"lastUpdated"`
		} `json:"meta"`
		Gender string `json:"gender"`
	}
	if err := json.Unmarshal(cur.Body, &m); err != nil {
		t.Fatal(err)
	}
	if m.Meta.VersionID != "2" || m.Gender != "female" || m.Meta.LastUpdated != fhir.FormatInstant(cur.LastUpdated) {
		t.Fatalf("current version body: %s", cur.Body)
	}
	v1, err := s.ReadVersion(ctx, "Patient", "p1", 1)
	if err != nil || !strings.Contains(string(v1.Body), `"family":"Fp1"`) || !strings.Contains(string(v1.Body), `"versionId":"1"`) {
		t.Fatalf("version 1: %v %s", err, v1.Body)
	}
	if _, err := s.ReadVersion(ctx, "Patient", "p1", 3); kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("version 3: %v", err)
	}
	h, err := s.History(ctx, "Patient", "p1")
	if err != nil || len(h) != 2 || h[0].Version != 2 || h[1].Version != 1 {
		t.Fatalf("history: %v %+v", err, h)
	}
	if _, err := s.Read(ctx, "Patient", "nope"); kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("missing read: %v", err)
	}
}

func testNoOpUpdate(t *testing.T, s Store) {
	write(t, s, Put(t, patient("p1")))
	// Same content, other key order and a client-sent meta.versionId: no new version.
	res := write(t, s, Put(t, `{"name":[{"family":"Fp1"}],"id":"p1","meta":{"versionId":"9"},"resourceType":"Patient"}`))
	if !res[0].Unchanged || res[0].Version != 1 {
		t.Fatalf("identical update: %+v", res[0])
	}
}

func testDelete(t *testing.T, s Store) {
	ctx := context.Background()
	write(t, s, Put(t, patient("p1")))
	res := write(t, s, kiln.Write{Kind: kiln.Delete, Type: "Patient", ID: "p1"})
	if res[0].Version != 2 || !res[0].Deleted {
		t.Fatalf("delete: %+v", res[0])
	}
	if _, err := s.Read(ctx, "Patient", "p1"); kiln.ErrorCode(err) != kiln.EGONE {
		t.Fatalf("read deleted: %v", err)
	}
	res = write(t, s, kiln.Write{Kind: kiln.Delete, Type: "Patient", ID: "p1"})
	if !res[0].Unchanged {
		t.Fatalf("second delete should be a no-op: %+v", res[0])
	}
	h, err := s.History(ctx, "Patient", "p1")
	if err != nil || len(h) != 2 || !h[0].Deleted {
		t.Fatalf("history after delete: %v %+v", err, h)
	}
	// Re-creating after a delete makes version 3.
	res = write(t, s, Put(t, patient("p1")))
	if res[0].Version != 3 {
		t.Fatalf("recreate: %+v", res[0])
	}
	counts, _ := s.Counts(ctx)
	if counts["Patient"] != 1 {
		t.Fatalf("counts: %v", counts)
	}
}

func testConflicts(t *testing.T, s Store) {
	ctx := context.Background()
	w := Put(t, patient("p1"))
	w.Kind = kiln.Create
	write(t, s, w)
	if _, err := s.Write(ctx, []kiln.Write{w}); kiln.ErrorCode(err) != kiln.ECONFLICT {
		t.Fatalf("second create: %v", err)
	}
	u := Put(t, `{"resourceType":"Patient","id":"p1","gender":"male"}`)
	u.IfMatch = 7
	if _, err := s.Write(ctx, []kiln.Write{u}); kiln.ErrorCode(err) != kiln.EPRECONDITION {
		t.Fatalf("If-Match 7: %v", err)
	}
	u.IfMatch = 1
	if res := write(t, s, u); res[0].Version != 2 {
		t.Fatalf("If-Match 1: %+v", res[0])
	}
}

func testAtomic(t *testing.T, s Store) {
	ctx := context.Background()
	write(t, s, Put(t, patient("p0")))
	dup := Put(t, patient("p0"))
	dup.Kind = kiln.Create
	_, err := s.Write(ctx, []kiln.Write{Put(t, patient("p1")), Put(t, observation("o1", "p1")), dup})
	if kiln.ErrorCode(err) != kiln.ECONFLICT {
		t.Fatalf("batch with a conflict: %v", err)
	}
	for _, ref := range []kiln.Ref{{Type: "Patient", ID: "p1"}, {Type: "Observation", ID: "o1"}} {
		if _, err := s.Read(ctx, ref.Type, ref.ID); kiln.ErrorCode(err) != kiln.ENOTFOUND {
			t.Fatalf("%v stored from a failed batch: %v", ref, err)
		}
	}
	if refs, _ := s.CompartmentOf(ctx, "p1"); len(refs) != 0 {
		t.Fatalf("index rows from a failed batch: %v", refs)
	}
	// The same resource twice in one batch: the second is a new version.
	res := write(t, s, Put(t, patient("p2")), Put(t, `{"resourceType":"Patient","id":"p2","gender":"other"}`))
	if res[1].Version != 2 {
		t.Fatalf("twice in one batch: %+v", res)
	}
}

func testClock(t *testing.T, s Store) {
	ctx := context.Background()
	var last time.Time
	for i := range 5 {
		res := write(t, s, Put(t, patient(fmt.Sprint("c", i))))
		if res[0].LastUpdated.Before(last) {
			t.Fatalf("lastUpdated went back: %v after %v", res[0].LastUpdated, last)
		}
		last = res[0].LastUpdated
		snap, err := s.SnapshotTime(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if snap.Before(last) {
			t.Fatalf("snapshot %v before committed write %v", snap, last)
		}
		next := write(t, s, Put(t, patient(fmt.Sprint("d", i))))
		if !next[0].LastUpdated.After(snap) {
			t.Fatalf("write after snapshot %v has lastUpdated %v", snap, next[0].LastUpdated)
		}
		last = next[0].LastUpdated
	}
}

func testCompartment(t *testing.T, s Store) {
	write(t, s,
		Put(t, patient("a")), Put(t, patient("b")),
		Put(t, observation("o-subject", "a")),
		Put(t, `{"resourceType":"Observation","id":"o-performer","status":"final","code":{"text":"x"},"subject":{"reference":"Group/g"},"performer":[{"reference":"Patient/b"}]}`),
		Put(t, `{"resourceType":"Observation","id":"o-absolute","status":"final","code":{"text":"x"},"subject":{"reference":"http://kiln.test/4_0_0/Patient/a"}}`),
		Put(t, `{"resourceType":"Observation","id":"o-foreign","status":"final","code":{"text":"x"},"subject":{"reference":"http://elsewhere.example/Patient/a"}}`),
		Put(t, `{"resourceType":"Claim","id":"c1","status":"active","type":{"text":"t"},"use":"claim","patient":{"reference":"Patient/a"},"created":"2020-01-01","provider":{"reference":"Organization/org1"},"priority":{"text":"normal"},"insurance":[{"sequence":1,"focal":true,"coverage":{"reference":"Coverage/x"}}]}`),
		Put(t, `{"resourceType":"Encounter","id":"e1","status":"finished","class":{"code":"AMB"},"subject":{"reference":"Patient/b"},"participant":[{"individual":{"reference":"Practitioner/dr1"}}]}`),
		Put(t, `{"resourceType":"ExplanationOfBenefit","id":"eob1","status":"active","type":{"text":"t"},"use":"claim","patient":{"reference":"#p"},"created":"2020-01-01","insurer":{"display":"x"},"provider":{"display":"x"},"outcome":"complete","insurance":[{"focal":true,"coverage":{"display":"x"}}],"contained":[{"resourceType":"Patient","id":"p","link":[{"other":{"reference":"Patient/a"},"type":"seealso"}]}]}`),
	)
	got := func(p string) []string { return compartmentIDs(t, s, p) }
	if want, have := []string{"Claim/c1", "Observation/o-absolute", "Observation/o-subject", "Patient/a"}, got("a"); !slices.Equal(want, have) {
		t.Errorf("compartment of a: want %v, have %v", want, have)
	}
	if want, have := []string{"Encounter/e1", "Observation/o-performer", "Patient/b"}, got("b"); !slices.Equal(want, have) {
		t.Errorf("compartment of b: want %v, have %v", want, have)
	}
	// An update that moves the Observation to another patient moves its index row.
	write(t, s, Put(t, observation("o-subject", "b")))
	if have := got("a"); slices.Contains(have, "Observation/o-subject") {
		t.Errorf("stale compartment row after update: %v", have)
	}
}

// compartmentIDs lists patient p's compartment now, as Type/id.
func compartmentIDs(t *testing.T, s Store, p string) []string {
	t.Helper()
	refs, err := s.CompartmentOf(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range refs {
		out = append(out, r.Type+"/"+r.ID)
	}
	return out
}

func testSearch(t *testing.T, s Store) {
	ctx := context.Background()
	var ws []kiln.Write
	for i := range 7 {
		ws = append(ws, Put(t, fmt.Sprintf(`{"resourceType":"Patient","id":"s%d","identifier":[{"system":"urn:mrn","value":"m%d"}]}`, i, i%2)))
	}
	write(t, s, ws...)
	page, err := s.Search(ctx, kiln.SearchQuery{Type: "Patient", Identifier: []string{"urn:mrn|m1"}, Total: true})
	if err != nil || page.Total != 3 || len(page.Resources) != 3 {
		t.Fatalf("identifier search: %v %+v", err, page)
	}
	if page, _ := s.Search(ctx, kiln.SearchQuery{Type: "Patient", Identifier: []string{"other|m1"}, Total: true}); page.Total != 0 || len(page.Resources) != 0 {
		t.Fatalf("identifier with another system matched %d", page.Total)
	}
	var ids []string
	q := kiln.SearchQuery{Type: "Patient", Count: 3}
	for {
		page, err := s.Search(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range page.Resources {
			ids = append(ids, r.ID)
		}
		if page.Next == 0 {
			break
		}
		q.After = page.Next
	}
	if len(ids) != 7 {
		t.Fatalf("paging returned %v", ids)
	}

	// Patients narrows to the compartment index: s1's Observations only.
	write(t, s, Put(t, observation("so-1", "s1")), Put(t, observation("so-2", "s1")), Put(t, observation("so-3", "s2")))
	page, err = s.Search(ctx, kiln.SearchQuery{Type: "Observation", Patients: []string{"s1"}, Total: true})
	if err != nil || page.Total != 2 || len(page.Resources) != 2 {
		t.Fatalf("compartment search: %v %+v", err, page)
	}
	page, _ = s.Search(ctx, kiln.SearchQuery{Type: "Observation", Patients: []string{"s1", "s2"}, Count: 10})
	if len(page.Resources) != 3 {
		t.Fatalf("compartment search of two patients: %d resources", len(page.Resources))
	}
	if page, _ := s.Search(ctx, kiln.SearchQuery{Type: "Observation", Patients: []string{"nobody"}}); len(page.Resources) != 0 {
		t.Fatalf("compartment of nobody: %d resources", len(page.Resources))
	}
}

func scanIDs(t *testing.T, s Store, q kiln.ScanQuery) []string {
	t.Helper()
	var ids []string
	err := s.Scan(context.Background(), q, func(b []byte) error {
		var m struct{ ID, Gender string }
		if err := json.Unmarshal(b, &m); err != nil {
			return err
		}
		ids = append(ids, m.ID+m.Gender)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(ids)
	return ids
}

func testScanSnapshot(t *testing.T, s Store) {
	ctx := context.Background()
	write(t, s, Put(t, patient("keep")), Put(t, patient("upd")), Put(t, patient("del")))
	snap, _ := s.SnapshotTime(ctx)
	write(t, s, Put(t, `{"resourceType":"Patient","id":"upd","gender":"male"}`), Put(t, patient("new")))
	write(t, s, kiln.Write{Kind: kiln.Delete, Type: "Patient", ID: "del"})
	for _, batch := range []int{1, 2, 100} {
		got := scanIDs(t, s, kiln.ScanQuery{Type: "Patient", Snapshot: snap, Batch: batch})
		if want := []string{"del", "keep", "upd"}; !slices.Equal(got, want) {
			t.Fatalf("batch %d: snapshot scan = %v, want %v", batch, got, want)
		}
	}
	now, _ := s.SnapshotTime(ctx)
	if got, want := scanIDs(t, s, kiln.ScanQuery{Type: "Patient", Snapshot: now, Batch: 2}), []string{"keep", "new", "updmale"}; !slices.Equal(got, want) {
		t.Fatalf("current scan = %v, want %v", got, want)
	}
	// _since: only what changed after it.
	if got := scanIDs(t, s, kiln.ScanQuery{Type: "Patient", Snapshot: now, Since: snap, Batch: 2}); !slices.Equal(got, []string{"new", "updmale"}) {
		t.Fatalf("since scan = %v", got)
	}
	// _until bounds the other end: resources as they are now, last changed by then.
	if got := scanIDs(t, s, kiln.ScanQuery{Type: "Patient", Snapshot: now, Until: snap, Batch: 2}); !slices.Equal(got, []string{"keep"}) {
		t.Fatalf("until scan = %v", got)
	}
	pats, err := s.PatientsAt(ctx, snap, nil)
	if err != nil || !slices.Equal(pats, []string{"del", "keep", "upd"}) {
		t.Fatalf("patients at snapshot: %v %v", err, pats)
	}
	pats, _ = s.PatientsAt(ctx, now, []string{"del", "new", "nobody"})
	if !slices.Equal(pats, []string{"new"}) {
		t.Fatalf("patients now among ids: %v", pats)
	}
}

func testScanPatients(t *testing.T, s Store) {
	ctx := context.Background()
	// o-shared is in both a's and c's compartments (subject and performer).
	write(t, s, Put(t, patient("a")), Put(t, patient("b")), Put(t, patient("c")),
		Put(t, observation("o-a", "a")), Put(t, observation("o-c", "c")),
		Put(t, `{"resourceType":"Observation","id":"o-shared","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/c"},"performer":[{"reference":"Patient/a"},{"reference":"Practitioner/dr"}]}`),
		Put(t, `{"resourceType":"Practitioner","id":"dr"}`),
		Put(t, `{"resourceType":"Practitioner","id":"unused"}`),
		Put(t, `{"resourceType":"Device","id":"dev","patient":{"reference":"Patient/b"}}`),
	)
	snap, _ := s.SnapshotTime(ctx)
	if err := s.SetPatients(ctx, "job1", []string{"a", "b", "c"}); err != nil {
		t.Fatal(err)
	}
	var all []string
	for lo := 0; lo < 3; lo++ {
		all = append(all, scanIDs(t, s, kiln.ScanQuery{Type: "Observation", Snapshot: snap, Job: "job1", PatientLo: lo, PatientHi: lo, Batch: 1})...)
	}
	sort.Strings(all)
	if want := []string{"o-a", "o-c", "o-shared"}; !slices.Equal(all, want) {
		t.Fatalf("observations over single-patient batches: %v, want each once %v", all, want)
	}
	if got := scanIDs(t, s, kiln.ScanQuery{Type: "Practitioner", Snapshot: snap, Job: "job1", Supporting: true}); !slices.Equal(got, []string{"dr"}) {
		t.Fatalf("supporting practitioners: %v", got)
	}
	if got := scanIDs(t, s, kiln.ScanQuery{Type: "Device", Snapshot: snap, Job: "job1", Supporting: true}); !slices.Equal(got, []string{"dev"}) {
		t.Fatalf("supporting devices: %v", got)
	}
	if err := s.SetPatients(ctx, "job2", []string{"b"}); err != nil {
		t.Fatal(err)
	}
	if got := scanIDs(t, s, kiln.ScanQuery{Type: "Observation", Snapshot: snap, Job: "job2", PatientLo: 0, PatientHi: 0}); len(got) != 0 {
		t.Fatalf("patient b has no observations, got %v", got)
	}
}

// testScanPatientsAsOfSnapshot: a patient batch reads the compartment as it
// was at the snapshot, not as it is now, so a record whose references move
// between patients after the snapshot goes to the batch of the patient it
// belonged to then, once, in its version of then.
func testScanPatientsAsOfSnapshot(t *testing.T, s Store) {
	ctx := context.Background()
	obs := func(id, status, subject string, performer ...string) kiln.Write {
		perf := ""
		for _, p := range performer {
			perf += fmt.Sprintf(`,"performer":[{"reference":"Patient/%s"}]`, p)
		}
		return Put(t, fmt.Sprintf(`{"resourceType":"Observation","id":%q,"status":%q,"code":{"text":"x"},"subject":{"reference":"Patient/%s"}%s}`, id, status, subject, perf))
	}
	write(t, s, Put(t, patient("a")), Put(t, patient("b")), Put(t, patient("c")),
		obs("o-out", "final", "a"),   // moves from a to b
		obs("o-in", "final", "b"),    // moves from b to a
		obs("o-joins", "final", "c"), // gains a as performer: a has the lower ordinal
		obs("o-back", "final", "a"),  // goes to b and comes back to a
		obs("o-stays", "final", "a"), // changes, stays with a
		obs("o-gone", "final", "a"),  // deleted
		obs("o-twice", "final", "c"), // written twice in one batch
	)
	snap, _ := s.SnapshotTime(ctx)
	write(t, s, obs("o-out", "amended", "b"), obs("o-in", "amended", "a"), obs("o-joins", "amended", "c", "a"),
		obs("o-back", "amended", "b"), obs("o-stays", "amended", "a"))
	write(t, s, obs("o-back", "corrected", "a"), kiln.Write{Kind: kiln.Delete, Type: "Observation", ID: "o-gone"},
		obs("o-twice", "amended", "b"), obs("o-twice", "corrected", "a"))
	now, _ := s.SnapshotTime(ctx)
	scan := func(snapshot time.Time, job string, lo int) []string {
		var ids []string
		err := s.Scan(ctx, kiln.ScanQuery{Type: "Observation", Snapshot: snapshot, Job: job, PatientLo: lo, PatientHi: lo, Batch: 2}, func(b []byte) error {
			var m struct{ ID, Status string }
			if err := json.Unmarshal(b, &m); err != nil {
				return err
			}
			ids = append(ids, m.ID+":"+m.Status)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		sort.Strings(ids)
		return ids
	}
	if err := s.SetPatients(ctx, "abc", []string{"a", "b", "c"}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		at   time.Time
		name string
		want [3][]string
	}{
		{snap, "snapshot", [3][]string{
			{"o-back:final", "o-gone:final", "o-out:final", "o-stays:final"},
			{"o-in:final"},
			{"o-joins:final", "o-twice:final"},
		}},
		{now, "now", [3][]string{
			{"o-back:corrected", "o-in:amended", "o-joins:amended", "o-stays:amended", "o-twice:corrected"},
			{"o-out:amended"},
			nil,
		}},
	} {
		for lo, want := range tc.want {
			if got := scan(tc.at, "abc", lo); !slices.Equal(got, want) {
				t.Errorf("%s, batch of patient %d: %v, want %v", tc.name, lo, got, want)
			}
		}
	}
	// A Patient-level export of a alone, and of b alone, as of the snapshot.
	if err := s.SetPatients(ctx, "a", []string{"a"}); err != nil {
		t.Fatal(err)
	}
	if got, want := scan(snap, "a", 0), []string{"o-back:final", "o-gone:final", "o-out:final", "o-stays:final"}; !slices.Equal(got, want) {
		t.Errorf("patient a at the snapshot: %v, want %v", got, want)
	}
	if err := s.SetPatients(ctx, "b", []string{"b"}); err != nil {
		t.Fatal(err)
	}
	if got, want := scan(snap, "b", 0), []string{"o-in:final"}; !slices.Equal(got, want) {
		t.Errorf("patient b at the snapshot: %v, want %v", got, want)
	}
	// Search reads the compartment as it is now.
	if got, want := compartmentIDs(t, s, "b"), []string{"Observation/o-out", "Patient/b"}; !slices.Equal(got, want) {
		t.Errorf("b's compartment now: %v, want %v", got, want)
	}
}

// testTwiceInBatch: a batch that writes one resource twice leaves exactly
// the second version's index rows — its tenants, not the first's too.
func testTwiceInBatch(t *testing.T, s Store) {
	ctx := context.Background()
	obs := func(status, code string) kiln.Write {
		return Put(t, fmt.Sprintf(`{"resourceType":"Observation","id":"o","meta":{"security":[{"system":%q,"code":%q}]},"status":%q,"code":{"text":"x"},"subject":{"reference":"Patient/a"}}`, kiln.AccessSystem, code, status))
	}
	write(t, s, Put(t, patient("a")), obs("final", "t0"))
	write(t, s, obs("amended", "t1"), obs("corrected", "t1"))
	write(t, s, obs("amended", "t1"), obs("corrected", "t2"))
	snap, _ := s.SnapshotTime(ctx)
	for code, want := range map[string]int{"t0": 0, "t1": 0, "t2": 1} {
		n := 0
		if err := s.Scan(ctx, kiln.ScanQuery{Type: "Observation", Snapshot: snap, AccessCodes: []string{code}}, func([]byte) error { n++; return nil }); err != nil {
			t.Fatal(err)
		}
		if n != want {
			t.Errorf("tenant %s sees %d Observations, want %d", code, n, want)
		}
	}
}

func testSplit(t *testing.T, s Store) {
	ctx := context.Background()
	var ws []kiln.Write
	for i := range 25 {
		ws = append(ws, Put(t, patient(fmt.Sprintf("p%02d", i))))
	}
	// Two writes in two milliseconds of a pinned clock (a fast machine
	// would otherwise put both in one).
	t0 := time.Now().UTC().Truncate(time.Millisecond)
	s.SetClock(func() time.Time { return t0 })
	write(t, s, ws[:10]...)
	s.SetClock(func() time.Time { return t0.Add(5 * time.Millisecond) })
	write(t, s, ws[10:]...)
	s.SetClock(time.Now)
	snap, _ := s.SnapshotTime(ctx)
	bounds, err := s.SplitType(ctx, "Patient", snap, 7)
	if err != nil {
		t.Fatal(err)
	}
	if len(bounds) != 3 {
		t.Fatalf("25 rows in runs of 7: %d bounds", len(bounds))
	}
	var all []string
	from := kiln.Cursor{}
	for _, b := range append(bounds, kiln.Cursor{}) {
		got := scanIDs(t, s, kiln.ScanQuery{Type: "Patient", Snapshot: snap, From: from, To: b, Batch: 3})
		all = append(all, got...)
		from = b
	}
	sort.Strings(all)
	if len(all) != 25 || len(slices.Compact(all)) != 25 {
		t.Fatalf("ranges covered %d rows: %v", len(all), all)
	}
	// _since is exclusive in every range, also in one that starts inside
	// the millisecond _since names (the first write's 10 rows share it).
	first, err := s.Read(ctx, "Patient", "p01")
	if err != nil {
		t.Fatal(err)
	}
	from = kiln.Cursor{}
	var after []string
	for _, b := range append(bounds, kiln.Cursor{}) {
		after = append(after, scanIDs(t, s, kiln.ScanQuery{Type: "Patient", Snapshot: snap, Since: first.LastUpdated, From: from, To: b, Batch: 3})...)
		from = b
	}
	for _, id := range after {
		if r, _ := s.Read(ctx, "Patient", id); r != nil && !r.LastUpdated.After(first.LastUpdated) {
			t.Fatalf("_since=%s exported %s, stamped at it", first.LastUpdated, id)
		}
	}
	if len(after) != 15 {
		t.Fatalf("_since the first write's millisecond: %d rows, want the second write's 15", len(after))
	}
}

func testDeletions(t *testing.T, s Store) {
	ctx := context.Background()
	write(t, s, Put(t, patient("a")), Put(t, observation("o1", "a")), Put(t, observation("o2", "a")))
	before, _ := s.SnapshotTime(ctx)
	write(t, s, kiln.Write{Kind: kiln.Delete, Type: "Observation", ID: "o1"})
	after, _ := s.SnapshotTime(ctx)
	write(t, s, kiln.Write{Kind: kiln.Delete, Type: "Observation", ID: "o2"})
	var got []string
	err := s.Deletions(ctx, []string{"Observation", "Patient"}, before, after, "", nil, func(d kiln.Deleted) error {
		got = append(got, d.Type+"/"+d.ID)
		return nil
	})
	if err != nil || !slices.Equal(got, []string{"Observation/o1"}) {
		t.Fatalf("deletions in window: %v %v", err, got)
	}
	s.SetPatients(ctx, "j", []string{"a"})
	got = nil
	s.Deletions(ctx, []string{"Observation"}, before, after, "j", nil, func(d kiln.Deleted) error {
		got = append(got, d.Type+"/"+d.ID)
		return nil
	})
	if !slices.Equal(got, []string{"Observation/o1"}) {
		t.Fatalf("deletions of the job's patients: %v", got)
	}
}

func testUnits(t *testing.T, s Store) {
	ctx := context.Background()
	now := time.Now().UTC()
	job := &kiln.Job{ID: "j1", Owner: "me", State: kiln.JobAccepted, Created: now, Updated: now}
	units := []kiln.Unit{{Job: "j1", Seq: 0, Kind: kiln.UnitType, Type: "Patient"}, {Job: "j1", Seq: 1, Kind: kiln.UnitType, Type: "Observation"}}
	if err := s.CreateJob(ctx, job, units, kiln.JobLimits{}); err != nil {
		t.Fatal(err)
	}
	u1, err := s.ClaimUnit(ctx, time.Minute)
	if err != nil || u1 == nil {
		t.Fatalf("claim: %v %v", u1, err)
	}
	u2, _ := s.ClaimUnit(ctx, time.Minute)
	if u2 == nil || u2.Seq == u1.Seq {
		t.Fatalf("second claim got %+v after %+v", u2, u1)
	}
	if u3, _ := s.ClaimUnit(ctx, time.Minute); u3 != nil {
		t.Fatalf("third claim got %+v", u3)
	}
	if ok, err := s.FinishUnit(ctx, u1, []kiln.Part{{Type: "Patient", Name: "000000-x", Count: 3, Kind: "output"}}); !ok || err != nil {
		t.Fatalf("finish: %v %v", ok, err)
	}
	if ok, _ := s.FinishUnit(ctx, u1, nil); ok {
		t.Fatal("a unit finished twice")
	}
	if c, err := s.HeartbeatUnit(ctx, u2, time.Minute); c != kiln.ClaimHeld || err != nil {
		t.Fatalf("heartbeat: %v %v", c, err)
	}
	if err := s.ReleaseUnit(ctx, u2); err != nil {
		t.Fatal(err)
	}
	u4, _ := s.ClaimUnit(ctx, time.Minute)
	if u4 == nil || u4.Seq != u2.Seq || u4.Attempts != 2 {
		t.Fatalf("released unit claimed again: %+v", u4)
	}
	// The old claim is fenced off: it can neither heartbeat nor finish.
	if c, err := s.HeartbeatUnit(ctx, u2, time.Minute); c != kiln.ClaimLost || err != nil {
		t.Fatalf("a superseded claim's heartbeat: %v %v, want lost", c, err)
	}
	if ok, _ := s.FinishUnit(ctx, u2, nil); ok {
		t.Fatal("a superseded claim finished the unit")
	}
	total, done, _ := s.UnitCounts(ctx, "j1")
	if total != 2 || done != 1 {
		t.Fatalf("unit counts %d/%d", done, total)
	}
	parts, _ := s.Parts(ctx, "j1")
	if len(parts) != 1 || parts[0].Count != 3 {
		t.Fatalf("parts: %+v", parts)
	}
	all, mine, _ := s.Running(ctx, "me")
	if all != 1 || mine != 1 {
		t.Fatalf("running: %d %d", all, mine)
	}
	if _, err := s.UpdateJob(ctx, "j1", func(j *kiln.Job) error { j.State = kiln.JobCancelled; return nil }); err != nil {
		t.Fatal(err)
	}
	if ok, _ := s.FinishUnit(ctx, u4, nil); ok {
		t.Fatal("a unit of a cancelled job was recorded as done")
	}
	// A cancel reaches the units running in other processes through this:
	// the current claim of a cancelled job's unit hears "job gone".
	if c, err := s.HeartbeatUnit(ctx, u4, time.Minute); c != kiln.ClaimGone || err != nil {
		t.Fatalf("heartbeat of a cancelled job's unit: %v %v, want job gone", c, err)
	}
	// A lease that runs out hands the unit back.
	job2 := &kiln.Job{ID: "j2", Owner: "me", State: kiln.JobAccepted, Created: now, Updated: now}
	if err := s.CreateJob(ctx, job2, []kiln.Unit{{Job: "j2", Seq: 0, Kind: kiln.UnitType, Type: "Patient"}}, kiln.JobLimits{}); err != nil {
		t.Fatal(err)
	}
	u5, _ := s.ClaimUnit(ctx, -time.Second)
	if u5 == nil || u5.Job != "j2" {
		t.Fatalf("claim of j2: %+v", u5)
	}
	if n, err := s.ReleaseExpired(ctx); n != 1 || err != nil {
		t.Fatalf("release expired: %d %v", n, err)
	}
	if u6, _ := s.ClaimUnit(ctx, time.Minute); u6 == nil || u6.Job != "j2" || u6.Attempts != 2 {
		t.Fatalf("expired unit claimed again: %+v", u6)
	}
	if err := s.DeleteJob(ctx, "j1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetJob(ctx, "j1"); kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("deleted job: %v", err)
	}
}

// testAssertions: a client assertion key is fresh once; a replay is refused
// until the record expires; records are kept per key.
func testAssertions(t *testing.T, s Store) {
	ctx := context.Background()
	later := time.Now().Add(5 * time.Minute)
	for i, c := range []struct {
		key     string
		expires time.Time
		fresh   bool
	}{
		{"c1 j1", later, true},
		{"c1 j1", later, false}, // the replay
		{"c2 j1", later, true},  // the same jti of another client
		{"c1 old", time.Now().Add(-time.Minute), true},
		{"c1 old", later, true}, // its record had expired
		{"c1 j1", later, false},
	} {
		fresh, err := s.UseAssertion(ctx, c.key, c.expires)
		if err != nil || fresh != c.fresh {
			t.Fatalf("use %d (%q): fresh %v %v, want %v", i+1, c.key, fresh, err, c.fresh)
		}
	}
}

// testJobLimits (issue 16, finding 5): kick-offs racing each other cannot
// pass a limit: of ten concurrent jobs of one owner against a per-owner
// limit of 3, exactly three are stored; the store-wide limit then leaves
// room for exactly two of another owner; finished jobs do not count.
func testJobLimits(t *testing.T, s Store) {
	ctx := context.Background()
	lim := kiln.JobLimits{All: 5, PerOwner: 3}
	race := func(owner string, n int) (stored []string) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				now := time.Now().UTC()
				j := &kiln.Job{ID: fmt.Sprintf("%s-%d", owner, i), Owner: owner, State: kiln.JobAccepted, Created: now, Updated: now}
				errs[i] = s.CreateJob(ctx, j, []kiln.Unit{{Job: j.ID, Seq: 0, Kind: kiln.UnitType, Type: "Patient"}}, lim)
			}()
		}
		wg.Wait()
		for i, err := range errs {
			var le *kiln.LimitError
			switch {
			case err == nil:
				stored = append(stored, fmt.Sprintf("%s-%d", owner, i))
			case !errors.As(err, &le):
				t.Fatalf("CreateJob: %v", err)
			}
		}
		return stored
	}
	a := race("a", 10)
	if len(a) != 3 {
		t.Fatalf("owner a: %d of 10 concurrent jobs stored, per-owner limit 3", len(a))
	}
	if b := race("b", 10); len(b) != 2 {
		t.Fatalf("owner b: %d of 10 concurrent jobs stored with 3 of 5 places taken", len(b))
	}
	all, mine, err := s.Running(ctx, "a")
	if err != nil || all != 5 || mine != 3 {
		t.Fatalf("running: %d, %d of a, %v", all, mine, err)
	}
	if _, err := s.UpdateJob(ctx, a[0], func(j *kiln.Job) error { j.State = kiln.JobCompleted; return nil }); err != nil {
		t.Fatal(err)
	}
	if c := race("c", 3); len(c) != 1 {
		t.Fatalf("owner c: %d stored after a job finished, want 1", len(c))
	}
	if err := s.CreateJob(ctx, &kiln.Job{ID: "unlimited", Owner: "a", State: kiln.JobAccepted}, nil, kiln.JobLimits{}); err != nil {
		t.Fatalf("no limits: %v", err)
	}
}

func testJobPatients(t *testing.T, s Store) {
	ctx := context.Background()
	ids := []string{"p3", "p1", "p2", "p9"}
	if err := s.SetPatients(ctx, "j", ids); err != nil {
		t.Fatal(err)
	}
	got, err := s.JobPatients(ctx, "j", 1, 2)
	if err != nil || !slices.Equal(got, []string{"p1", "p2"}) {
		t.Fatalf("patients 1..2: %v %v", got, err)
	}
	if got, _ := s.JobPatients(ctx, "j", 0, 10); !slices.Equal(got, ids) {
		t.Fatalf("all patients in order: %v", got)
	}
	if got, _ := s.JobPatients(ctx, "other", 0, 10); len(got) != 0 {
		t.Fatalf("another job's patients: %v", got)
	}
}

// testTypesPresent: a type whose resources are all deleted is still
// present, so that a _since export plans its deletions.
func testTypesPresent(t *testing.T, s Store) {
	ctx := context.Background()
	write(t, s, Put(t, patient("p1")), Put(t, observation("o1", "p1")))
	write(t, s, kiln.Write{Kind: kiln.Delete, Type: "Observation", ID: "o1"})
	got, err := s.TypesPresent(ctx)
	if err != nil || !slices.Equal(got, []string{"Observation", "Patient"}) {
		t.Fatalf("types present: %v %v", got, err)
	}
}

func testViews(t *testing.T, s Store) {
	ctx := context.Background()
	t0 := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
	s.SetClock(func() time.Time { return t0 })
	if _, err := s.GetView(ctx, "v"); kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("unknown view: %v", err)
	}
	v, err := s.PutView(ctx, "v", []byte(`{"resource":"Patient"}`))
	if err != nil || v.Version != 1 || !v.Updated.Equal(t0) {
		t.Fatalf("first put: %+v %v", v, err)
	}
	s.SetClock(func() time.Time { return t0.Add(time.Second) })
	if v, err = s.PutView(ctx, "v", []byte(`{"resource":"Observation"}`)); err != nil || v.Version != 2 || !v.Updated.Equal(t0.Add(time.Second)) {
		t.Fatalf("second put: %+v %v", v, err)
	}
	s.PutView(ctx, "a", []byte(`{"resource":"Condition"}`))
	got, err := s.GetView(ctx, "v")
	if err != nil || got.Version != 2 || string(got.Body) != `{"resource":"Observation"}` {
		t.Fatalf("get: %+v %v", got, err)
	}
	all, err := s.Views(ctx)
	if err != nil || len(all) != 2 || all[0].ID != "a" || all[1].ID != "v" {
		t.Fatalf("list: %v %v", all, err)
	}
	if err := s.DeleteView(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteView(ctx, "v"); kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("second delete: %v", err)
	}
	if _, err := s.GetView(ctx, "v"); kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("deleted view: %v", err)
	}
}

func testSecrets(t *testing.T, s Store) {
	ctx := context.Background()
	a, err := s.Secret(ctx, "a", 16)
	if err != nil || len(a) != 16 {
		t.Fatalf("first: %x %v", a, err)
	}
	again, err := s.Secret(ctx, "a", 16)
	if err != nil || !slices.Equal(a, again) {
		t.Fatalf("again: %x %v, want %x", again, err, a)
	}
	b, err := s.Secret(ctx, "b", 16)
	if err != nil || slices.Equal(a, b) {
		t.Fatalf("another name: %x %v", b, err)
	}
}

func testClients(t *testing.T, s Store) {
	ctx := context.Background()
	if _, err := s.GetClient(ctx, "c1"); kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("unknown client: %v", err)
	}
	now := time.Now().UTC().Truncate(time.Millisecond)
	for _, c := range []*kiln.Client{{ID: "c1", JWKS: []byte(`{"keys":[]}`), Scope: "system/*.rs", Created: now}, {ID: "c2", JWKSURL: "https://c2.example/jwks", Scope: "system/Patient.rs", Created: now}} {
		if err := s.PutClient(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.PutClient(ctx, &kiln.Client{ID: "c1", JWKS: []byte(`{"keys":[]}`), Scope: "system/Observation.rs", Created: now}); err != nil {
		t.Fatal(err)
	}
	c, err := s.GetClient(ctx, "c1")
	if err != nil || c.Scope != "system/Observation.rs" || string(c.JWKS) != `{"keys":[]}` {
		t.Fatalf("client c1 after replacing: %+v %v", c, err)
	}
	all, err := s.Clients(ctx)
	if err != nil || len(all) != 2 {
		t.Fatalf("clients: %d %v", len(all), err)
	}
	if err := s.DeleteClient(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetClient(ctx, "c1"); kiln.ErrorCode(err) != kiln.ENOTFOUND {
		t.Fatalf("deleted client: %v", err)
	}
}

// events makes one message per change, so the test can count them.
type events struct{}

func (events) JobChanged(old, new *kiln.Job) []kiln.Message {
	return []kiln.Message{{Topic: "jobs", Key: new.ID, Value: []byte(string(new.State)), Headers: map[string]string{"h": "v"}}}
}

func (events) ResourcesWritten(res []kiln.WriteResult) []kiln.Message {
	var out []kiln.Message
	for _, r := range res {
		out = append(out, kiln.Message{Topic: "resources", Key: r.Type + "/" + r.ID, Value: []byte(fmt.Sprint(r.Version))})
	}
	return out
}

// testOutbox: an event is stored in its change's transaction — with it when
// it commits, not at all when it fails — and handed out oldest first until
// deleted.
func testOutbox(t *testing.T, s Store) {
	ctx := context.Background()
	s.SetEvents(events{})
	write(t, s, Put(t, patient("p1")), Put(t, observation("o1", "p1")))
	dup := Put(t, patient("p1"))
	dup.Kind = kiln.Create
	if _, err := s.Write(ctx, []kiln.Write{Put(t, patient("p2")), dup}); kiln.ErrorCode(err) != kiln.ECONFLICT {
		t.Fatalf("conflicting batch: %v", err)
	}
	write(t, s, Put(t, patient("p1"))) // unchanged: no event
	now := time.Now().UTC()
	if err := s.CreateJob(ctx, &kiln.Job{ID: "j1", Owner: "me", State: kiln.JobAccepted, Created: now, Updated: now}, nil, kiln.JobLimits{}); err != nil {
		t.Fatal(err)
	}
	if n, err := s.OutboxSize(ctx); n != 3 || err != nil {
		t.Fatalf("outbox size %d %v, want 3 (two resources, one job; none from the failed batch or the no-op)", n, err)
	}
	first, err := s.PendingMessages(ctx, 2)
	if err != nil || len(first) != 2 {
		t.Fatalf("pending: %v %v", first, err)
	}
	if first[0].Key != "Patient/p1" || first[1].Key != "Observation/o1" || first[0].Seq >= first[1].Seq {
		t.Fatalf("not oldest first: %+v", first)
	}
	if err := s.DeleteMessages(ctx, []int64{first[0].Seq, first[1].Seq}); err != nil {
		t.Fatal(err)
	}
	rest, err := s.PendingMessages(ctx, 10)
	if err != nil || len(rest) != 1 || rest[0].Topic != "jobs" || rest[0].Key != "j1" || string(rest[0].Value) != "accepted" || rest[0].Headers["h"] != "v" {
		t.Fatalf("after delivering two: %+v %v", rest, err)
	}
}
