package export_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/synth"
)

// exported runs an export to the end and returns the job and, per manifest
// file type and kind ("output/Observation", "error/OperationOutcome"), the
// lines written.
func (r *rig) exported(t *testing.T, req *kiln.ExportRequest) (*kiln.Job, map[string][]string) {
	t.Helper()
	ctx := context.Background()
	job, err := r.svc.Start(ctx, req, "t")
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		j, err := r.svc.Job(ctx, job.ID)
		if err != nil {
			t.Fatal(err)
		}
		if j.State == kiln.JobCompleted {
			job = j
			break
		}
		if j.State == kiln.JobFailed {
			t.Fatalf("export failed: %s", j.Error)
		}
		if time.Now().After(deadline) {
			t.Fatal("export did not finish")
		}
		time.Sleep(5 * time.Millisecond)
	}
	out := map[string][]string{}
	for _, f := range job.Files {
		rc, _, err := r.svc.OpenFile(ctx, job, f.Name)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(rc)
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			out[f.Kind+"/"+f.Type] = append(out[f.Kind+"/"+f.Type], sc.Text())
		}
		rc.Close()
		if err := sc.Err(); err != nil {
			t.Fatal(err)
		}
	}
	return job, out
}

// ids lists the ids of lines (sorted) and fails on an id seen twice.
func ids(t *testing.T, lines []string) []string {
	t.Helper()
	var out []string
	seen := map[string]bool{}
	for _, l := range lines {
		var r struct{ ID string }
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatal(err)
		}
		if seen[r.ID] {
			t.Errorf("%s written twice", r.ID)
		}
		seen[r.ID] = true
		out = append(out, r.ID)
	}
	sort.Strings(out)
	return out
}

type genResource struct {
	Type, ID string
	Subject  string
	Recorded string
	Targets  []string
	Body     string
}

// generated loads synth data into the rig and returns it as read from the
// generated files (not from the store).
func generated(t *testing.T, r *rig, patients int, extra ...string) []genResource {
	t.Helper()
	dir := t.TempDir()
	if _, err := synth.Generate(context.Background(), dir, synth.Options{Patients: patients, Seed: 19}); err != nil {
		t.Fatal(err)
	}
	var all []genResource
	var bodies []string
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
			bodies = append(bodies, string(line))
		}
	}
	bodies = append(bodies, extra...)
	for _, b := range bodies {
		var m struct {
			ResourceType, ID string
			Subject, Patient struct{ Reference string }
			Recorded         string
			Target           []struct{ Reference string }
		}
		if err := json.Unmarshal([]byte(b), &m); err != nil {
			t.Fatal(err)
		}
		g := genResource{Type: m.ResourceType, ID: m.ID, Subject: m.Subject.Reference + m.Patient.Reference, Recorded: m.Recorded, Body: b}
		for _, tg := range m.Target {
			g.Targets = append(g.Targets, tg.Reference)
		}
		all = append(all, g)
	}
	for start := 0; start < len(bodies); start += 2000 {
		r.put(t, bodies[start:min(start+2000, len(bodies))]...)
	}
	return all
}

// TestIncludeAssociatedDataOnGeneratedData: a Patient export of some
// patients' Observations and Procedures holds exactly the Provenance that
// target one of them (Relevant), or for each of them only the newest one
// (Latest); the expected sets are worked out from the generated input.
func TestIncludeAssociatedDataOnGeneratedData(t *testing.T) {
	r := newRig(t, export.Config{Workers: 2, UnitSize: 500})
	// Beside Synthea's one Provenance per encounter: an older and a newer
	// one of a single Observation (the newer is the latest for it only).
	dir := t.TempDir()
	synth.Generate(context.Background(), dir, synth.Options{Patients: 3, Seed: 19})
	obsData, _ := os.ReadFile(filepath.Join(dir, "Observation.ndjson"))
	var firstObs struct{ ID string }
	json.Unmarshal(bytes.SplitN(obsData, []byte("\n"), 2)[0], &firstObs)
	extra := []string{
		`{"resourceType":"Provenance","id":"prov-late","target":[{"reference":"Observation/` + firstObs.ID + `"}],"recorded":"2100-01-01T00:00:00Z","agent":[{"who":{"reference":"Organization/org-0"}}]}`,
		`{"resourceType":"Provenance","id":"prov-early","target":[{"reference":"Observation/` + firstObs.ID + `"}],"recorded":"1900-01-01T00:00:00Z","agent":[{"who":{"reference":"Organization/org-0"}}]}`,
	}
	all := generated(t, r, 3, extra...)

	var pats []string
	for _, g := range all {
		if g.Type == "Patient" {
			pats = append(pats, g.ID)
		}
	}
	sort.Strings(pats)
	chosen := pats[:2]
	// The exported set, from the input: those patients' Observations and Procedures.
	want := map[string]bool{}
	for _, g := range all {
		if (g.Type == "Observation" || g.Type == "Procedure") && slices.Contains(chosen, strings.TrimPrefix(g.Subject, "Patient/")) {
			want[g.Type+"/"+g.ID] = true
		}
	}
	if !want["Observation/"+firstObs.ID] {
		t.Fatalf("the first generated Observation is not of the chosen patients")
	}
	relevant := map[string]bool{}
	newest := map[string]genResource{}
	for _, g := range all {
		if g.Type != "Provenance" {
			continue
		}
		for _, tg := range g.Targets {
			if want[tg] {
				relevant[g.ID] = true
				if cur, ok := newest[tg]; !ok || g.Recorded > cur.Recorded {
					newest[tg] = g
				}
			}
		}
	}
	latest := map[string]bool{}
	for _, g := range newest {
		latest[g.ID] = true
	}
	if len(relevant) < 20 || !relevant["prov-early"] || latest["prov-early"] || !latest["prov-late"] || len(latest) != len(relevant)-1 {
		t.Fatalf("test data: %d relevant, %d latest", len(relevant), len(latest))
	}

	for _, tc := range []struct {
		mode string
		want map[string]bool
	}{{export.RelevantProvenance, relevant}, {export.LatestProvenance, latest}} {
		t.Run(tc.mode, func(t *testing.T) {
			req := systemReq()
			req.Level, req.Patients, req.Types = kiln.LevelPatient, chosen, []string{"Observation", "Procedure"}
			req.IncludeAssociatedData = []string{tc.mode}
			job, out := r.exported(t, req)
			var exported []string
			for _, typ := range []string{"Observation", "Procedure"} {
				for _, id := range ids(t, out["output/"+typ]) {
					exported = append(exported, typ+"/"+id)
				}
			}
			if got := slices.Sorted(maps.Keys(want)); !slices.Equal(slices.Sorted(slices.Values(exported)), got) {
				t.Fatalf("exported %d Observations and Procedures, want %d", len(exported), len(got))
			}
			got := ids(t, out["output/Provenance"])
			if w := slices.Sorted(maps.Keys(tc.want)); !slices.Equal(got, w) {
				var extra, missing []string
				for _, id := range got {
					if !tc.want[id] {
						extra = append(extra, id)
					}
				}
				for _, id := range w {
					if !slices.Contains(got, id) {
						missing = append(missing, id)
					}
				}
				t.Errorf("%d Provenance, want %d: not expected %v, missing %v", len(got), len(w), extra, missing)
			}
			if !slices.ContainsFunc(job.Files, func(f kiln.File) bool { return f.Type == "Provenance" && f.Kind == "output" }) {
				t.Errorf("no Provenance file in the manifest: %+v", job.Files)
			}
			if !slices.Equal(job.Request.IncludeAssociatedData, []string{tc.mode}) {
				t.Errorf("job echoes includeAssociatedData %v", job.Request.IncludeAssociatedData)
			}
		})
	}

	t.Run("without", func(t *testing.T) {
		req := systemReq()
		req.Level, req.Patients, req.Types = kiln.LevelPatient, chosen, []string{"Observation"}
		if _, out := r.exported(t, req); len(out["output/Provenance"]) != 0 {
			t.Errorf("%d Provenance without includeAssociatedData", len(out["output/Provenance"]))
		}
	})

	// _type holds Provenance already: every Provenance once, none added twice.
	t.Run("typeHasProvenance", func(t *testing.T) {
		req := systemReq()
		req.Types = []string{"Observation", "Provenance"}
		req.IncludeAssociatedData = []string{export.RelevantProvenance}
		_, out := r.exported(t, req)
		var wantAll []string
		for _, g := range all {
			if g.Type == "Provenance" {
				wantAll = append(wantAll, g.ID)
			}
		}
		sort.Strings(wantAll)
		if got := ids(t, out["output/Provenance"]); !slices.Equal(got, wantAll) {
			t.Errorf("%d Provenance, want each of the %d once", len(got), len(wantAll))
		}
	})

	// A token without Provenance in its scopes gets none, and is told.
	t.Run("scopeWithoutProvenance", func(t *testing.T) {
		req := systemReq()
		req.Types = []string{"Observation"}
		req.ReadTypes = []string{"Observation"}
		req.IncludeAssociatedData = []string{export.RelevantProvenance}
		_, out := r.exported(t, req)
		if len(out["output/Provenance"]) != 0 {
			t.Errorf("%d Provenance for a token that may not read Provenance", len(out["output/Provenance"]))
		}
		if errs := strings.Join(out["error/OperationOutcome"], "\n"); !strings.Contains(errs, "do not grant Provenance") {
			t.Errorf("error file %q does not say Provenance was left out", errs)
		}
	})
}

// TestIncludeAssociatedDataTenantsAndLatest: a tenant's export gets only
// that tenant's Provenance of its resources, and Latest picks the newest by
// recorded, then meta.lastUpdated, among what the tenant may see.
func TestIncludeAssociatedDataTenantsAndLatest(t *testing.T) {
	r := newRig(t, export.Config{Workers: 2})
	tag := func(code string) string {
		return `"meta":{"security":[{"system":"` + kiln.AccessSystem + `","code":"` + code + `"}]}`
	}
	prov := func(id, code, recorded string, targets ...string) string {
		var ts []string
		for _, tg := range targets {
			ts = append(ts, `{"reference":"`+tg+`"}`)
		}
		return `{"resourceType":"Provenance","id":"` + id + `",` + tag(code) + `,"target":[` + strings.Join(ts, ",") + `],"recorded":"` + recorded + `","agent":[{"who":{"reference":"Organization/o"}}]}`
	}
	r.put(t,
		`{"resourceType":"Observation","id":"a1",`+tag("a")+`,"status":"final","code":{"text":"x"}}`,
		`{"resourceType":"Observation","id":"b1",`+tag("b")+`,"status":"final","code":{"text":"x"}}`,
		prov("pa-old", "a", "2020-01-01T00:00:00Z", "Observation/a1"),
		prov("pa-new", "a", "2021-01-01T00:00:00Z", "Observation/a1"),
		prov("pb-newest", "b", "2022-01-01T00:00:00Z", "Observation/a1", "Observation/b1"),
		prov("pb", "b", "2020-06-01T00:00:00Z", "Observation/b1"),
		prov("pa-oldest", "a", "2019-01-01T00:00:00Z", "Observation/a1"),
	)
	// Recorded as pa-new, written later: the newer by meta.lastUpdated (and
	// the older by id, so that only meta.lastUpdated makes it the latest).
	// A snapshot between the writes makes the second one's lastUpdated later
	// (writes in one millisecond may share it).
	if _, err := r.db.SnapshotTime(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.put(t, prov("pa-0-tie", "a", "2021-01-01T00:00:00Z", "Observation/a1"))
	for _, tc := range []struct {
		tenant, mode string
		want         []string
	}{
		{"a", export.RelevantProvenance, []string{"pa-0-tie", "pa-new", "pa-old", "pa-oldest"}},
		{"a", export.LatestProvenance, []string{"pa-0-tie"}},
		{"b", export.RelevantProvenance, []string{"pb", "pb-newest"}},
		{"b", export.LatestProvenance, []string{"pb-newest"}},
	} {
		req := systemReq()
		req.Types = []string{"Observation"}
		req.Tenants = []string{tc.tenant}
		req.IncludeAssociatedData = []string{tc.mode}
		_, out := r.exported(t, req)
		if got := ids(t, out["output/Observation"]); !slices.Equal(got, []string{tc.tenant + "1"}) {
			t.Errorf("tenant %s: Observations %v", tc.tenant, got)
		}
		if got := ids(t, out["output/Provenance"]); !slices.Equal(got, tc.want) {
			t.Errorf("tenant %s, %s: Provenance %v, want %v", tc.tenant, tc.mode, got, tc.want)
		}
	}
}

// TestLenientMissingPatients: under handling=lenient a Patient export of
// ids of which some do not exist exports those that do and lists each
// missing one in the error file; strict, it is refused naming them.
func TestLenientMissingPatients(t *testing.T) {
	r := newRig(t, export.Config{Workers: 2})
	r.put(t,
		`{"resourceType":"Patient","id":"p1"}`,
		`{"resourceType":"Patient","id":"p2"}`,
		`{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p1"}}`,
		`{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p2"}}`,
	)
	req := systemReq()
	req.Level, req.Patients = kiln.LevelPatient, []string{"p1", "ghost", "gone"}
	if _, err := r.svc.Start(context.Background(), req, "t"); kiln.ErrorCode(err) != kiln.EINVALID ||
		!strings.Contains(kiln.ErrorMessage(err), "Patient/ghost") || !strings.Contains(kiln.ErrorMessage(err), "Patient/gone") {
		t.Fatalf("strict: %v, want invalid naming Patient/ghost and Patient/gone", err)
	}
	req = systemReq()
	req.Level, req.Patients, req.Lenient = kiln.LevelPatient, []string{"p1", "ghost", "gone"}, true
	job, out := r.exported(t, req)
	if got := ids(t, out["output/Observation"]); !slices.Equal(got, []string{"o1"}) {
		t.Errorf("Observations %v, want [o1]", got)
	}
	if got := ids(t, out["output/Patient"]); !slices.Equal(got, []string{"p1"}) {
		t.Errorf("Patients %v, want [p1]", got)
	}
	errs := out["error/OperationOutcome"]
	if len(errs) != 2 || !strings.Contains(errs[0]+errs[1], "Patient/ghost does not exist") || !strings.Contains(errs[0]+errs[1], "Patient/gone does not exist") {
		t.Errorf("error file %q", errs)
	}
	if job.Patients != 1 {
		t.Errorf("job covers %d patients", job.Patients)
	}
}

// TestIncludeAssociatedDataCompartmentProvenanceOnce: on a Patient export
// without _type, a Provenance of the patient (in its compartment) is written
// by the compartment unit and not again by the Provenance pass, which adds
// the one outside the compartment; a system export of Provenance itself
// holds each Provenance once, with no pass planned.
func TestIncludeAssociatedDataCompartmentProvenanceOnce(t *testing.T) {
	r := newRig(t, export.Config{Workers: 2})
	r.put(t,
		`{"resourceType":"Patient","id":"p1"}`,
		`{"resourceType":"Patient","id":"p2"}`,
		`{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p1"}}`,
		`{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p2"}}`,
		`{"resourceType":"Provenance","id":"in-comp","target":[{"reference":"Patient/p1"},{"reference":"Observation/o1"}],"recorded":"2020-01-01T00:00:00Z","agent":[{"who":{"reference":"Organization/x"}}]}`,
		`{"resourceType":"Provenance","id":"outside","target":[{"reference":"Observation/o1"}],"recorded":"2021-01-01T00:00:00Z","agent":[{"who":{"reference":"Organization/x"}}]}`,
		`{"resourceType":"Provenance","id":"other","target":[{"reference":"Observation/o2"}],"recorded":"2021-01-01T00:00:00Z","agent":[{"who":{"reference":"Organization/x"}}]}`,
	)
	for _, mode := range []string{export.RelevantProvenance, export.LatestProvenance} {
		req := systemReq()
		req.Level, req.Patients = kiln.LevelPatient, []string{"p1"}
		req.IncludeAssociatedData = []string{mode}
		job, out := r.exported(t, req)
		// Latest: "outside" is the newest of o1, "in-comp" the only one of p1.
		if got := ids(t, out["output/Provenance"]); !slices.Equal(got, []string{"in-comp", "outside"}) {
			t.Errorf("%s: Provenance %v, want [in-comp outside]", mode, got)
		}
		plain := *req
		plain.IncludeAssociatedData = nil
		if base, _ := r.exported(t, &plain); job.UnitsTotal != base.UnitsTotal+1 {
			t.Errorf("%s: %d units, %d without includeAssociatedData: want one more, the Provenance pass", mode, job.UnitsTotal, base.UnitsTotal)
		}
	}
	req := systemReq()
	req.Types = []string{"Observation", "Provenance"}
	req.IncludeAssociatedData = []string{export.RelevantProvenance}
	job, out := r.exported(t, req)
	if got := ids(t, out["output/Provenance"]); !slices.Equal(got, []string{"in-comp", "other", "outside"}) {
		t.Errorf("system export of Provenance: %v", got)
	}
	plain := *req
	plain.IncludeAssociatedData = nil
	if base, _ := r.exported(t, &plain); job.UnitsTotal != base.UnitsTotal {
		t.Errorf("%d units, %d without includeAssociatedData: a Provenance pass planned although the export holds every Provenance", job.UnitsTotal, base.UnitsTotal)
	}
}

// TestIncludeAssociatedDataMemoryBudget: the Provenance index has a byte
// budget; an export that would need more fails with a message saying how to
// narrow it, instead of holding memory in proportion to the data.
func TestIncludeAssociatedDataMemoryBudget(t *testing.T) {
	var bodies []string
	for i := range 50 {
		bodies = append(bodies,
			fmt.Sprintf(`{"resourceType":"Observation","id":"o%d","status":"final","code":{"text":"x"}}`, i),
			fmt.Sprintf(`{"resourceType":"Provenance","id":"p%d","target":[{"reference":"Observation/o%d"}],"recorded":"2020-01-01T00:00:00Z","agent":[{"who":{"reference":"Organization/o"}}]}`, i, i))
	}
	for _, tc := range []struct {
		budget int64
		fails  bool
	}{{1 << 20, false}, {2 << 10, true}} {
		r := newRig(t, export.Config{Workers: 2, AssociatedIndexBytes: tc.budget})
		r.put(t, bodies...)
		req := systemReq()
		req.Types = []string{"Observation"}
		req.IncludeAssociatedData = []string{export.RelevantProvenance}
		ctx := context.Background()
		job, err := r.svc.Start(ctx, req, "t")
		if err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for !job.Finished() {
			if time.Now().After(deadline) {
				t.Fatal("export did not finish")
			}
			time.Sleep(5 * time.Millisecond)
			if job, err = r.svc.Job(ctx, job.ID); err != nil {
				t.Fatal(err)
			}
		}
		if failed := job.State == kiln.JobFailed; failed != tc.fails || (failed && !strings.Contains(job.Error, "narrow the export")) {
			t.Errorf("budget %d: %s %q", tc.budget, job.State, job.Error)
		}
	}
}
