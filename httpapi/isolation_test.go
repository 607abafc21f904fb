package httpapi_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// TestIsolationTable (issue 17): for each path a token can read through —
// search (plain, filtered, with _total), read, vread, history, and the
// system- and Patient-level exports — and each kind of token, the exact set
// of resources answered equals the set the access rules allow, computed
// here from the test data alone (the tenant each record was tagged with and
// whether an Observation is a laboratory one), not from Kiln's policy.
func TestIsolationTable(t *testing.T) {
	d := newTenantData(t)
	r := newAuthEnv(t, envOpts{})
	r.load(d.dir)
	all := slices.Sorted(maps.Keys(d.tenant))

	type kind struct {
		name, scope string
		tenant      string   // "" for every tenant
		types       []string // readable types; nil for all
		labOnly     bool     // Observations only of category laboratory
		refused     bool     // no access/ scope: sees nothing (exports are 403)
		// patient is the token's patient context (patient/ scopes: only that
		// patient's compartment; exports are 403); noContext: patient/ scopes
		// without one, which grant nothing.
		patient   string
		noContext bool
		// noGroups: the Group scope's query filter matches no Group.
		noGroups bool
	}
	// Compartment membership, read here from the data: a Patient is in its
	// own compartment, an Observation or Condition in its subject's.
	subject := map[string]string{}
	for _, typ := range []string{"Observation", "Condition"} {
		b, err := os.ReadFile(filepath.Join(d.dir, typ+".ndjson"))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range bytes.Split(bytes.TrimSpace(b), []byte("\n")) {
			var res struct {
				ID      string
				Subject struct{ Reference string }
			}
			json.Unmarshal(line, &res)
			subject[typ+"/"+res.ID] = strings.TrimPrefix(res.Subject.Reference, "Patient/")
		}
	}
	var patientA string // a tenant-A patient with tenant-A Observations
	for _, ref := range all {
		if id, ok := strings.CutPrefix(ref, "Patient/"); ok && d.tenant[ref] == "tenantA" && patientA == "" {
			for o, s := range subject {
				if s == id && d.tenant[o] == "tenantA" && strings.HasPrefix(o, "Observation/") {
					patientA = id
					break
				}
			}
		}
	}
	if patientA == "" {
		t.Fatal("no tenant-A patient with tenant-A Observations in the data")
	}
	// A Group of every patient, tagged for both tenants: each token's
	// Group-level export holds only the members it may see.
	var members []any
	for _, ref := range all {
		if strings.HasPrefix(ref, "Patient/") {
			members = append(members, map[string]any{"entity": map[string]any{"reference": ref}})
		}
	}
	gb, _ := json.Marshal(map[string]any{"resourceType": "Group", "id": "iso-mixed", "type": "person", "actual": true, "member": members,
		"meta": map[string]any{"security": []any{map[string]any{"system": kiln.AccessSystem, "code": "tenantA"}, map[string]any{"system": kiln.AccessSystem, "code": "tenantB"}}}})
	admin := bearer(r.token(t, "admin", "system/*.* access/*.*"))
	if res := r.do("PUT", "/Group/iso-mixed", gb, append(admin, "Content-Type", "application/fhir+json")...); res.StatusCode/100 != 2 {
		t.Fatalf("PUT the Group: %d %s", res.StatusCode, res.body)
	}
	const mixed = "Group/iso-mixed" // in both tenants, so not in d.tenant
	all = append(all, mixed)
	for _, m := range members { // in every member's compartment
		d.patients[mixed] = append(d.patients[mixed], strings.TrimPrefix(m.(map[string]any)["entity"].(map[string]any)["reference"].(string), "Patient/"))
	}
	kinds := []kind{
		{name: "tenant A, v1", scope: "system/*.read access/tenantA.read", tenant: "tenantA"},
		{name: "tenant B, v2", scope: "system/*.rs access/tenantB.read", tenant: "tenantB"},
		{name: "both tenants", scope: "system/*.rs access/tenantA.read access/tenantB.read"},
		{name: "access/*", scope: "system/*.rs access/*.read"},
		{name: "A, Patient and lab Observations", scope: "system/Patient.rs system/Observation.rs?category=laboratory access/tenantA.read",
			tenant: "tenantA", types: []string{"Patient", "Observation"}, labOnly: true},
		// Under access-tags, types without a tenant: every record is
		// someone's, so reads are 404 and searches empty; exports refuse.
		{name: "no access scope", scope: "system/*.rs", refused: true},
		{name: "patient/ with a context", scope: "patient/Patient.rs patient/Observation.rs patient/Condition.rs access/tenantA.read",
			tenant: "tenantA", types: []string{"Patient", "Observation", "Condition"}, patient: patientA},
		{name: "patient/ without a context", scope: "patient/*.rs access/*.read", types: []string{}, noContext: true},
		{name: "Groups of animals only", scope: "system/Group.rs?type=animal system/Patient.rs system/Observation.rs system/Condition.rs access/*.read",
			types: []string{"Group", "Patient", "Observation", "Condition"}, noGroups: true},
	}
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			// The kinds share the server and the data and change no record: in parallel.
			t.Parallel()
			var claims map[string]any
			if k.patient != "" {
				claims = map[string]any{"patient": k.patient}
			}
			// Each kind its own client: they run at once, and one client's
			// running exports are limited.
			tok, err := r.verifier.Mint("iso-"+k.name, k.scope, time.Minute, claims)
			if err != nil {
				t.Fatal(err)
			}
			auth := bearer(tok)
			visible := func(ref string) bool {
				typ, _, _ := strings.Cut(ref, "/")
				switch {
				case k.refused:
					return false
				case ref == mixed:
					return k.types == nil && !k.noContext && k.patient == ""
				case k.noGroups && typ == "Group":
					return false
				case k.tenant != "" && d.tenant[ref] != k.tenant:
					return false
				case k.types != nil && !slices.Contains(k.types, typ):
					return false
				case k.labOnly && typ == "Observation" && !d.lab[ref]:
					return false
				case k.patient != "" && typ == "Patient" && ref != "Patient/"+k.patient:
					return false
				case k.patient != "" && typ != "Patient" && subject[ref] != k.patient:
					return false
				}
				return true
			}
			allowed := func(typ string, extra func(string) bool) map[string]bool {
				out := map[string]bool{}
				for _, ref := range all {
					if strings.HasPrefix(ref, typ+"/") && visible(ref) && (extra == nil || extra(ref)) {
						out[ref] = true
					}
				}
				return out
			}
			typeReadable := func(typ string) bool {
				return k.types == nil || slices.Contains(k.types, typ)
			}

			// Search, following every page.
			for _, q := range []struct {
				path  string
				typ   string
				extra func(string) bool
			}{
				{"/Observation?_count=1000", "Observation", nil},
				{"/Observation?category=laboratory&_count=1000", "Observation", func(ref string) bool { return d.lab[ref] }},
				{"/Patient?_count=7", "Patient", nil},
				{"/Condition?_count=1000", "Condition", nil},
			} {
				got, status := searchAll(t, r, q.path, auth)
				if !typeReadable(q.typ) {
					if status != 403 {
						t.Errorf("%s: %d, want 403", q.path, status)
					}
					continue
				}
				if status != 200 {
					t.Fatalf("%s: %d", q.path, status)
				}
				if diff := diffRefs(got, allowed(q.typ, q.extra)); diff != "" {
					t.Errorf("%s: %s", q.path, diff)
				}
			}
			// What Kiln does not support is refused, for every token, with an
			// OperationOutcome and no resource: _include and _revinclude,
			// chained and reverse-chained parameters, _summary.
			for _, path := range []string{"/Observation?_include=Observation:subject", "/Observation?_revinclude=Provenance:target",
				"/Observation?subject.name=x", "/Patient?_has:Observation:patient:code=1234", "/Observation?_summary=count"} {
				res := r.do("GET", path, nil, auth...)
				if res.StatusCode != 400 && res.StatusCode != 403 || !strings.Contains(string(res.body), `"resourceType":"OperationOutcome"`) ||
					strings.Contains(string(res.body), `"resourceType":"Observation"`) || strings.Contains(string(res.body), `"resourceType":"Patient"`) {
					t.Errorf("%s: %d %.200s, want a refusal carrying no resource", path, res.StatusCode, res.body)
				}
			}
			// _total=accurate counts only what may be read.
			if typeReadable("Observation") {
				res := r.do("GET", "/Observation?_total=accurate&_count=0", nil, auth...)
				var b struct{ Total int }
				json.Unmarshal(res.body, &b)
				if want := len(allowed("Observation", nil)); res.StatusCode != 200 || b.Total != want {
					t.Errorf("_total=accurate: %d, total %d, want %d", res.StatusCode, b.Total, want)
				}
			}
			// Read, vread and history of a sample of every type: 200 exactly
			// when visible; otherwise 404 (or 403 for a type the token cannot
			// read at all), whoever owns it.
			for i, ref := range all {
				if i%17 != 0 {
					continue
				}
				typ, _, _ := strings.Cut(ref, "/")
				for _, path := range []string{"/" + ref, "/" + ref + "/_history/1", "/" + ref + "/_history"} {
					res := r.do("GET", path, nil, auth...)
					want := 404
					switch {
					case visible(ref):
						want = 200
					case !typeReadable(typ):
						want = 403
					}
					if res.StatusCode != want {
						t.Errorf("GET %s: %d, want %d", path, res.StatusCode, want)
					}
					if want != 200 && strings.Contains(string(res.body), `"id":"`+strings.TrimPrefix(ref, typ+"/")+`"`) {
						t.Errorf("GET %s: the refusal carries the resource", path)
					}
				}
			}
			// Exports: exactly the visible resources, at every level, and with
			// _typeFilter and _elements; and the rows of a view export.
			lab := "/$export?_type=Observation&_typeFilter=" + url.QueryEscape("Observation?category=laboratory")
			elements := "/$export?_type=Observation,Condition&_elements=status"
			for _, path := range []string{"/$export", "/Patient/$export", "/Group/iso-mixed/$export", lab, elements, "$viewdefinition-export"} {
				var res response
				if path == "$viewdefinition-export" {
					res = r.do("POST", "/$viewdefinition-export", exportParams(viewParam("ids", `{"resource":"Observation","select":[{"column":[{"name":"ref","path":"getResourceKey()"}]}]}`)),
						append(bearer(tok), "Prefer", "respond-async", "Content-Type", "application/fhir+json")...)
				} else {
					res = r.do("GET", path, nil, append(bearer(tok), "Prefer", "respond-async")...)
				}
				if k.refused || k.patient != "" || k.noContext {
					if res.StatusCode != 403 {
						t.Errorf("%s: %d, want 403", path, res.StatusCode)
					}
					continue
				}
				if path == "$viewdefinition-export" && !typeReadable("Observation") || path == "/Group/iso-mixed/$export" && !typeReadable("Group") {
					if res.StatusCode != 403 {
						t.Errorf("%s: %d, want 403", path, res.StatusCode)
					}
					continue
				}
				if path == "/Group/iso-mixed/$export" && !visible(mixed) {
					// A Group the token may not read is as unknown as none.
					if res.StatusCode != 404 {
						t.Errorf("%s: %d, want 404", path, res.StatusCode)
					}
					continue
				}
				if res.StatusCode != 202 {
					t.Fatalf("%s: %d %s", path, res.StatusCode, res.body)
				}
				got := map[string]bool{}
				if path == "$viewdefinition-export" {
					st := waitView(t, r.env, res.Header.Get("Content-Location"), bearer(tok)...)
					for _, b := range viewFiles(t, r.env, st.outputs["ids"], bearer(tok)...) {
						for _, l := range sortedLines(b) {
							var row struct{ Ref string }
							json.Unmarshal([]byte(l), &row)
							got[row.Ref] = true
						}
					}
				} else {
					m := r.mustCompleteAuth(res.Header.Get("Content-Location"), tok)
					for typ, ids := range r.idsAuth(m, tok) {
						for _, id := range ids {
							got[typ+"/"+id] = true
						}
					}
				}
				want := map[string]bool{}
				for _, ref := range all {
					typ, _, _ := strings.Cut(ref, "/")
					switch {
					case !visible(ref):
					case path == lab && (typ != "Observation" || !d.lab[ref]):
					case path == elements && typ != "Observation" && typ != "Condition":
					case path == "$viewdefinition-export" && typ != "Observation":
					default:
						want[ref] = true
					}
				}
				if path == "/Patient/$export" || path == "/Group/iso-mixed/$export" {
					// Patient level: the data of the patients the token sees —
					// compartment records tied to one of them; outside the
					// compartment, only what their data references.
					population := map[string]bool{}
					for _, ref := range all {
						if id, ok := strings.CutPrefix(ref, "Patient/"); ok && visible(ref) {
							population[id] = true
						}
					}
					for ref := range got {
						if d.tenant[ref] == "" && ref != mixed {
							t.Errorf("%s: %s exported, which is not in the data", path, ref)
						}
					}
					for ref := range want {
						if inCompartmentType(ref) && !d.inPopulation(ref, population) || !inCompartmentType(ref) && !got[ref] {
							delete(want, ref)
						}
					}
				}
				if diff := diffRefs(got, want); diff != "" {
					t.Errorf("%s: %s", path, diff)
				}
			}
		})
	}
}

// searchAll runs a search and follows its next links; it returns type/id of
// every entry and the status of the first page that was not 200 (or 200).
func searchAll(t *testing.T, r *authRig, path string, auth []string) (map[string]bool, int) {
	t.Helper()
	got := map[string]bool{}
	next := r.base + path
	for pages := 0; next != ""; pages++ {
		if pages > 200 {
			t.Fatalf("%s: more than 200 pages", path)
		}
		res := r.do("GET", next, nil, auth...)
		if res.StatusCode != 200 {
			return got, res.StatusCode
		}
		var b struct {
			Link  []struct{ Relation, URL string }
			Entry []struct {
				Resource struct{ ResourceType, ID string }
			}
		}
		if err := json.Unmarshal(res.body, &b); err != nil {
			t.Fatalf("%s: %v", next, err)
		}
		for _, e := range b.Entry {
			ref := e.Resource.ResourceType + "/" + e.Resource.ID
			if got[ref] {
				t.Errorf("%s: %s on two pages", path, ref)
			}
			got[ref] = true
		}
		next = ""
		for _, l := range b.Link {
			if l.Relation == "next" {
				next = l.URL
			}
		}
	}
	return got, 200
}

// inCompartmentType reports whether ref's type is in the R4 Patient
// compartment (so a Patient-level export must hold every visible one).
func inCompartmentType(ref string) bool {
	typ, _, _ := strings.Cut(ref, "/")
	return fhir.R4().InCompartment(typ)
}

// TestIsolationWhileRecordsChurn (issue 17): tenant A's exports, kicked off
// before another client re-tags records between the tenants, deletes,
// recreates and creates them (half before the export's units run, half while
// they run), hold exactly the records A could read at the export's snapshot,
// each in its snapshot version; afterwards A's searches show exactly the new
// state. Both sets are computed here from the test data and the writes made.
func TestIsolationWhileRecordsChurn(t *testing.T) {
	d := newTenantData(t)
	r := newAuthEnv(t, envOpts{noWorkers: true})
	// The store's clock is the test's: the data and the exports' snapshot at
	// t0, every write after them at t0+1s (no two sides of a boundary can
	// share a millisecond).
	clock := pinClock(t, r.env)
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	clock.set(t0)
	r.load(d.dir)
	admin := bearer(r.token(t, "admin", "system/*.* access/tenantA.* access/tenantB.*"))
	tokA := r.token(t, "alice", "system/*.rs access/tenantA.read")
	before := map[string]bool{}
	for ref, tn := range d.tenant {
		if tn == "tenantA" {
			before[ref] = true
		}
	}
	var locs []string
	for _, path := range []string{"/$export", "/Patient/$export"} {
		res := r.do("GET", path, nil, append(bearer(tokA), "Prefer", "respond-async")...)
		if res.StatusCode != 202 {
			t.Fatalf("%s: %d %s", path, res.StatusCode, res.body)
		}
		locs = append(locs, res.Header.Get("Content-Location"))
	}
	clock.set(t0.Add(time.Second))

	// The writes: Observations re-tagged each way, deleted, deleted and
	// recreated for the other tenant, and new ones; each new version says "churned".
	var obs []string
	for ref := range d.tenant {
		if strings.HasPrefix(ref, "Observation/") {
			obs = append(obs, ref)
		}
	}
	slices.Sort(obs)
	after := maps.Clone(before)
	rewritten := map[string]bool{} // records written after the snapshot
	deletedA := map[string]bool{}  // deleted records (true: A's), until written again
	put := func(ref, tenant string) {
		rewritten[ref] = true
		res := r.do("GET", "/"+ref, nil, admin...)
		var m map[string]any
		if res.StatusCode == 200 {
			json.Unmarshal(res.body, &m)
		} else {
			typ, id, _ := strings.Cut(ref, "/")
			m = map[string]any{"resourceType": typ, "id": id, "status": "final", "code": map[string]any{"text": "new"}}
		}
		m["meta"] = map[string]any{"security": []any{map[string]any{"system": kiln.AccessSystem, "code": tenant}}}
		m["note"] = []any{map[string]any{"text": "churned"}}
		delete(deletedA, ref)
		b, _ := json.Marshal(m)
		if res := r.do("PUT", "/"+ref, b, append(admin, "Content-Type", "application/fhir+json")...); res.StatusCode/100 != 2 {
			t.Errorf("PUT %s: %d %s", ref, res.StatusCode, res.body)
		}
		after[ref] = tenant == "tenantA"
		if !after[ref] {
			delete(after, ref)
		}
	}
	del := func(ref string) {
		rewritten[ref] = true
		deletedA[ref] = d.tenant[ref] == "tenantA"
		if res := r.do("DELETE", "/"+ref, nil, admin...); res.StatusCode != 204 {
			t.Errorf("DELETE %s: %d %s", ref, res.StatusCode, res.body)
		}
		delete(after, ref)
	}
	churn := func(part []string, n int) {
		for i, ref := range part {
			switch i % 5 {
			case 0:
				put(ref, map[string]string{"tenantA": "tenantB", "tenantB": "tenantA"}[d.tenant[ref]])
			case 1:
				del(ref)
			case 2:
				del(ref)
				put(ref, map[string]string{"tenantA": "tenantB", "tenantB": "tenantA"}[d.tenant[ref]])
			case 3:
				put(fmt.Sprintf("Observation/churn-%d-%d", n, i), []string{"tenantA", "tenantB"}[i%2])
			}
		}
	}
	half := obs[:min(len(obs), 200)]
	churn(half[:100], 1) // before any unit runs
	done := make(chan struct{})
	go func() { defer close(done); churn(half[100:], 2) }() // while they run
	r.startWorkers()
	<-done

	for i, loc := range locs {
		m := r.mustCompleteAuth(loc, tokA)
		got := map[string]bool{}
		for _, it := range m.Output {
			for _, l := range r.linesAuth(it.URL, tokA) {
				if strings.Contains(string(l), "churned") {
					t.Errorf("%s: a version written after the snapshot: %.120s", loc, l)
				}
				var res struct{ ResourceType, ID string }
				json.Unmarshal(l, &res)
				got[res.ResourceType+"/"+res.ID] = true
			}
		}
		want := maps.Clone(before)
		if i == 1 { // Patient level: A's patients' data; outside the compartment, only what it references
			population := map[string]bool{}
			for ref := range before {
				if id, ok := strings.CutPrefix(ref, "Patient/"); ok {
					population[id] = true
				}
			}
			for ref := range want {
				if inCompartmentType(ref) && !d.inPopulation(ref, population) || !inCompartmentType(ref) && !got[ref] {
					delete(want, ref)
				}
			}
		}
		if diff := diffRefs(got, want); diff != "" {
			types := map[string][2]int{}
			for ref := range want {
				typ, _, _ := strings.Cut(ref, "/")
				c := types[typ]
				c[0]++
				if got[ref] {
					c[1]++
				}
				types[typ] = c
			}
			var errs []string
			for _, e := range m.Error {
				for _, l := range r.linesAuth(e.URL, tokA) {
					errs = append(errs, string(l))
				}
			}
			t.Errorf("%s: %s; want/got by type %v; errors %v; tt %s", loc, diff, types, errs, m.TransactionTime)
		}
	}
	// REST now: exactly the new state.
	got, status := searchAll(t, r, "/Observation?_count=1000", bearer(tokA))
	want := map[string]bool{}
	for ref := range after {
		if strings.HasPrefix(ref, "Observation/") {
			want[ref] = true
		}
	}
	if status != 200 {
		t.Fatalf("search: %d", status)
	}
	if diff := diffRefs(got, want); diff != "" {
		t.Errorf("search after the writes: %s", diff)
	}

	// An incremental export since t0: exactly the records written since that
	// A may read now, and the deletions of A's records — none of B's.
	res := r.do("GET", "/$export?_since="+url.QueryEscape(t0.Format("2006-01-02T15:04:05.000Z")), nil, append(bearer(tokA), "Prefer", "respond-async")...)
	if res.StatusCode != 202 {
		t.Fatalf("_since kick-off: %d %s", res.StatusCode, res.body)
	}
	m := r.mustCompleteAuth(res.Header.Get("Content-Location"), tokA)
	changed, deletions := map[string]bool{}, map[string]bool{}
	for ref := range after {
		if rewritten[ref] {
			changed[ref] = true
		}
	}
	for ref, wasA := range deletedA {
		if wasA {
			deletions[ref] = true
		}
	}
	gotChanged, gotDeleted := map[string]bool{}, map[string]bool{}
	for _, it := range m.Output {
		for _, l := range r.linesAuth(it.URL, tokA) {
			var res struct{ ResourceType, ID string }
			json.Unmarshal(l, &res)
			gotChanged[res.ResourceType+"/"+res.ID] = true
		}
	}
	for _, it := range m.Deleted {
		for _, l := range r.linesAuth(it.URL, tokA) {
			var b struct {
				Entry []struct{ Request struct{ URL string } }
			}
			json.Unmarshal(l, &b)
			for _, e := range b.Entry {
				gotDeleted[strings.TrimPrefix(e.Request.URL, "/")] = true
			}
		}
	}
	if len(changed) == 0 || len(deletions) == 0 {
		t.Fatalf("the writes changed %d of A's records and deleted %d: the test writes too little", len(changed), len(deletions))
	}
	if diff := diffRefs(gotChanged, changed); diff != "" {
		t.Errorf("_since export, resources: %s", diff)
	}
	if diff := diffRefs(gotDeleted, deletions); diff != "" {
		t.Errorf("_since export, deletions: %s", diff)
	}
}
