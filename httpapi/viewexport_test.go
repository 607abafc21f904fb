package httpapi_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln/export"
)

// exportParams is a $viewdefinition-export Parameters body: parameter
// members as JSON.
func exportParams(ps ...string) []byte {
	return []byte(`{"resourceType":"Parameters","parameter":[` + strings.Join(ps, ",") + `]}`)
}

// viewParam is a view parameter with an inline view and, if given, a name.
func viewParam(name, view string) string {
	parts := []string{`{"name":"viewResource","resource":` + view + `}`}
	if name != "" {
		parts = append([]string{`{"name":"name","valueString":"` + name + `"}`}, parts...)
	}
	return `{"name":"view","part":[` + strings.Join(parts, ",") + `]}`
}

// viewStatus is a view export's status Parameters, read.
type viewStatus struct {
	code    int
	params  map[string][]any // name → values (value[x], or the parts of output)
	outputs map[string][]string
}

func readViewStatus(t *testing.T, res response) viewStatus {
	t.Helper()
	var p struct {
		ResourceType string
		Parameter    []map[string]any
	}
	if err := json.Unmarshal(res.body, &p); err != nil || p.ResourceType != "Parameters" {
		t.Fatalf("status %d is not a Parameters: %v %s", res.StatusCode, err, res.body)
	}
	st := viewStatus{code: res.StatusCode, params: map[string][]any{}, outputs: map[string][]string{}}
	for _, pm := range p.Parameter {
		name := pm["name"].(string)
		if name == "output" {
			var view string
			var locs []string
			for _, x := range pm["part"].([]any) {
				part := x.(map[string]any)
				switch part["name"] {
				case "name":
					view = part["valueString"].(string)
				case "location":
					locs = append(locs, part["valueUri"].(string))
				}
			}
			st.outputs[view] = locs
			continue
		}
		for k, v := range pm {
			if strings.HasPrefix(k, "value") || k == "resource" {
				st.params[name] = append(st.params[name], v)
			}
		}
	}
	return st
}

func (s viewStatus) str(name string) string {
	if v := s.params[name]; len(v) == 1 {
		if x, ok := v[0].(string); ok {
			return x
		}
	}
	return ""
}

// waitView polls a view export until it is no longer running (each poll
// held by Prefer: wait until the job ends).
func waitView(t *testing.T, e *env, loc string, headers ...string) viewStatus {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		st := readViewStatus(t, e.do("GET", loc, nil, append([]string{"Prefer", "wait=10"}, headers...)...))
		if s := st.str("status"); s != "accepted" && s != "in-progress" {
			return st
		}
	}
	t.Fatalf("view export %s did not finish", loc)
	return viewStatus{}
}

// viewFiles downloads every file of a view and returns their bodies.
func viewFiles(t *testing.T, e *env, locs []string, headers ...string) [][]byte {
	t.Helper()
	var out [][]byte
	for _, l := range locs {
		res := e.do("GET", l, nil, headers...)
		if res.StatusCode != 200 {
			t.Fatalf("download %s: %d %s", l, res.StatusCode, res.body)
		}
		out = append(out, res.body)
	}
	return out
}

// TestViewExport (issue 21): $viewdefinition-export runs views as an export
// job — over the snapshot taken at kick-off, with patient filtering, in each
// format — and answers SQL on FHIR's status Parameters.
func TestViewExport(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true})
	put(t, e, `{"resourceType":"Patient","id":"a","active":true,"name":[{"family":"Ng, Jr"}]}`, `{"resourceType":"Patient","id":"b"}`,
		obs("o1", "a", `,"valueQuantity":{"value":1.50}`), obs("o2", "b", `,"valueQuantity":{"value":7}`), obs("o3", "a", ""))
	kick := func(ps ...string) string {
		t.Helper()
		res := e.do("POST", "/ViewDefinition/$viewdefinition-export", exportParams(ps...),
			"Prefer", "respond-async", "Content-Type", "application/fhir+json")
		if res.StatusCode != 202 {
			t.Fatalf("kick-off: %d %s", res.StatusCode, res.body)
		}
		st := readViewStatus(t, res)
		loc := res.Header.Get("Content-Location")
		if st.str("status") != "accepted" || st.str("location") != loc || st.str("exportId") == "" || !strings.HasSuffix(loc, st.str("exportId")) {
			t.Fatalf("kick-off answer: %s (Content-Location %s)", res.body, loc)
		}
		return loc
	}

	// Two views in one job, ndjson; the records change after the kick-off.
	loc := kick(viewParam("patients", patientView), viewParam("", obsView), `{"name":"clientTrackingId","valueString":"run-7"}`)
	put(t, e, `{"resourceType":"Patient","id":"a","active":false,"name":[{"family":"Later"}]}`, obs("o4", "b", ""))
	e.startWorkers()
	st := waitView(t, e, loc)
	if st.code != 200 || st.str("status") != "completed" || st.str("clientTrackingId") != "run-7" || st.str("_format") != "ndjson" ||
		st.str("exportStartTime") == "" || st.str("exportEndTime") == "" || st.str("transactionTime") == "" {
		t.Fatalf("completed status: %d %v", st.code, st.params)
	}
	if len(st.outputs) != 2 || len(st.outputs["patients"]) != 1 || len(st.outputs["view_2"]) != 1 {
		t.Fatalf("outputs: %v", st.outputs)
	}
	res := e.do("GET", st.outputs["patients"][0], nil)
	if res.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Errorf("ndjson file Content-Type %q", res.Header.Get("Content-Type"))
	}
	// The rows of the snapshot: a as it was, no o4.
	if got, want := sortedLines(res.body), []string{`{"id":"Patient/a","family":"Ng, Jr","active":true}`, `{"id":"Patient/b","family":null,"active":null}`}; !slices.Equal(got, want) {
		t.Errorf("patients view:\n%q\nwant\n%q", got, want)
	}
	if got, want := sortedLines(viewFiles(t, e, st.outputs["view_2"])[0]), []string{
		`{"id":"o1","patient":"Patient/a","value":1.50}`, `{"id":"o2","patient":"Patient/b","value":7}`, `{"id":"o3","patient":"Patient/a","value":null}`,
	}; !slices.Equal(got, want) {
		t.Errorf("observations view:\n%q\nwant\n%q", got, want)
	}

	// patient: only that patient's compartment; CSV with its header.
	loc = kick(viewParam("obs", obsView), `{"name":"patient","valueReference":{"reference":"Patient/a"}}`, `{"name":"_format","valueCode":"csv"}`)
	st = waitView(t, e, loc)
	if st.str("status") != "completed" || len(st.outputs["obs"]) != 1 {
		t.Fatalf("patient a: %v %v", st.params, st.outputs)
	}
	csv := viewFiles(t, e, st.outputs["obs"])[0]
	if lines := strings.Split(strings.TrimSpace(string(csv)), "\n"); len(lines) != 3 || lines[0] != "id,patient,value" ||
		!slices.Equal(sortedLines([]byte(strings.Join(lines[1:], "\n"))), []string{"o1,Patient/a,1.50", "o3,Patient/a,"}) {
		t.Errorf("csv for patient a:\n%s", csv)
	}

	// group: only its members' compartments.
	put(t, e, `{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/b"}}]}`)
	loc = kick(viewParam("obs", obsView), `{"name":"group","valueReference":{"reference":"Group/g"}}`, `{"name":"_format","valueCode":"csv"}`, `{"name":"header","valueBoolean":false}`)
	st = waitView(t, e, loc)
	if st.str("status") != "completed" || len(st.outputs["obs"]) != 1 {
		t.Fatalf("group g: %v %v", st.params, st.outputs)
	}
	if got := sortedLines(viewFiles(t, e, st.outputs["obs"])[0]); !slices.Equal(got, []string{"o2,Patient/b,7", "o4,Patient/b,"}) {
		t.Errorf("csv for group g: %q", got)
	}

	// Parquet: whole files, served as such.
	loc = kick(viewParam("obs", obsView), `{"name":"_format","valueCode":"parquet"}`)
	st = waitView(t, e, loc)
	if st.str("status") != "completed" || len(st.outputs["obs"]) != 1 {
		t.Fatalf("parquet: %v %v", st.params, st.outputs)
	}
	res = e.do("GET", st.outputs["obs"][0], nil, "Accept-Encoding", "gzip")
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "application/vnd.apache.parquet" || res.Header.Get("Content-Encoding") != "" ||
		!bytes.HasPrefix(res.body, []byte("PAR1")) || !bytes.HasSuffix(res.body, []byte("PAR1")) {
		t.Errorf("parquet file: %d %s %q %.20q", res.StatusCode, res.Header.Get("Content-Type"), res.Header.Get("Content-Encoding"), res.body)
	}

	// A view that fails on the data fails the job, saying why (status
	// failed in a 202, as SQL on FHIR has it).
	loc = kick(viewParam("bad", `{"resource":"Patient","select":[{"column":[{"name":"g","path":"(id | 'x')"}]}]}`))
	st = waitView(t, e, loc)
	if st.code != 202 || st.str("status") != "failed" || len(st.params["outcome"]) != 1 || !strings.Contains(fmt.Sprint(st.params["outcome"]), "view bad, Patient/") {
		t.Errorf("failed view: %d %v", st.code, st.params)
	}

	// The CapabilityStatement names both operations; run answers at system level too.
	var ops []string
	for _, o := range e.do("GET", "/metadata", nil).json(t)["rest"].([]any)[0].(map[string]any)["operation"].([]any) {
		ops = append(ops, o.(map[string]any)["name"].(string))
	}
	if !slices.Contains(ops, "viewdefinition-export") || !slices.Contains(ops, "viewdefinition-run") {
		t.Errorf("CapabilityStatement operations: %v", ops)
	}
	if res := e.do("POST", "/$viewdefinition-run?_format=csv", runParams(patientView)); res.StatusCode != 200 || !strings.HasPrefix(string(res.body), "id,family,active\n") {
		t.Errorf("system-level $viewdefinition-run: %d %s", res.StatusCode, res.body)
	}

	// Cancel: DELETE on the location, then the job is gone.
	e.stopWorkers()
	loc = kick(viewParam("obs", obsView))
	if res := e.do("DELETE", loc, nil); res.StatusCode != 202 {
		t.Fatalf("cancel: %d %s", res.StatusCode, res.body)
	}
	if res := e.do("GET", loc, nil); res.StatusCode != 404 {
		t.Errorf("status after cancel: %d %s", res.StatusCode, res.body)
	}
}

// TestViewExportFileLimits: a view's rows are split over files by the file
// limits and by work units, each a whole file of its format (a CSV header
// in each): a unit's part is never joined to another's.
func TestViewExportFileLimits(t *testing.T) {
	for _, tc := range []struct {
		name  string
		cfg   export.Config
		files int
	}{
		{"2 rows a file", export.Config{MaxFileResources: 2}, 2},
		{"1 resource a unit", export.Config{UnitSize: 1}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) { testViewFileLimits(t, tc.cfg, tc.files) })
	}
}

func testViewFileLimits(t *testing.T, cfg export.Config, want int) {
	e := newEnv(t, envOpts{exportCfg: cfg})
	put(t, e, `{"resourceType":"Patient","id":"a"}`, obs("o1", "a", ""), obs("o2", "a", ""), obs("o3", "a", ""))
	res := e.do("POST", "/$viewdefinition-export", exportParams(viewParam("obs", obsView), `{"name":"_format","valueCode":"csv"}`), "Prefer", "respond-async")
	if res.StatusCode != 202 {
		t.Fatalf("kick-off: %d %s", res.StatusCode, res.body)
	}
	st := waitView(t, e, res.Header.Get("Content-Location"))
	files := viewFiles(t, e, st.outputs["obs"])
	if len(files) != want {
		t.Fatalf("3 rows: %d files, want %d", len(files), want)
	}
	var rows []string
	for _, f := range files {
		lines := strings.Split(strings.TrimSpace(string(f)), "\n")
		if lines[0] != "id,patient,value" || len(lines) > 3 {
			t.Errorf("file:\n%s", f)
		}
		rows = append(rows, lines[1:]...)
	}
	if slices.Sort(rows); !slices.Equal(rows, []string{"o1,Patient/a,", "o2,Patient/a,", "o3,Patient/a,"}) {
		t.Errorf("rows over the files: %q", rows)
	}
}

// TestViewExportRefusals: every mistake, and every parameter Kiln does not
// support, is a 400 OperationOutcome naming the element.
func TestViewExportRefusals(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true})
	put(t, e, `{"resourceType":"Patient","id":"a"}`)
	v := viewParam("p", patientView)
	for _, tc := range []struct {
		name    string
		path    string
		body    []byte
		noAsync bool
		at      string
	}{
		{"no Prefer: respond-async", "", exportParams(v), true, "Prefer"},
		{"no view", "", exportParams(`{"name":"_format","valueCode":"csv"}`), false, "Parameters.parameter"},
		{"not Parameters", "", []byte(`{"resourceType":"Patient"}`), false, "resourceType"},
		{"canonical viewReference", "", exportParams(`{"name":"view","part":[{"name":"viewReference","valueReference":{"reference":"http://example.org/ViewDefinition/x"}}]}`), false, "Parameters.parameter[0].part[0]"},
		{"viewResource and viewReference", "", exportParams(`{"name":"view","part":[{"name":"viewResource","resource":` + patientView + `},{"name":"viewReference","valueReference":{"reference":"ViewDefinition/x"}}]}`), false, "Parameters.parameter[0].part[1]"},
		{"no viewResource", "", exportParams(`{"name":"view","part":[{"name":"name","valueString":"x"}]}`), false, "Parameters.parameter[0]"},
		{"bad view", "", exportParams(viewParam("p", `{"resource":"Patient","select":[{"column":[{"name":"x","path":"name.("}]}]}`)), false, "ViewDefinition.select[0].column[0].path"},
		{"not an R4 type", "", exportParams(viewParam("p", `{"resource":"Frobnitz","select":[{"column":[{"name":"x","path":"id"}]}]}`)), false, "ViewDefinition.resource"},
		{"bad name", "", exportParams(viewParam("a b", patientView)), false, "Parameters.parameter[0].part[0]"},
		{"two views, one name", "", exportParams(v, viewParam("P", obsView)), false, "Parameters.parameter[1]"},
		{"a view named error", "", exportParams(viewParam("Error", patientView)), false, "Parameters.parameter[0].part[0]"},
		{"two viewResource parts", "", exportParams(`{"name":"view","part":[{"name":"viewResource","resource":` + patientView + `},{"name":"viewResource","resource":` + obsView + `}]}`), false, "Parameters.parameter[0].part[1]"},
		{"two name parts", "", exportParams(`{"name":"view","part":[{"name":"name","valueString":"a"},{"name":"name","valueString":"b"},{"name":"viewResource","resource":` + patientView + `}]}`), false, "Parameters.parameter[0].part[1]"},
		{"bad format", "", exportParams(v, `{"name":"_format","valueCode":"xml"}`), false, "Parameters.parameter[1]"},
		{"source", "", exportParams(v, `{"name":"source","valueString":"s3://x"}`), false, "Parameters.parameter[1]"},
		{"unknown parameter", "", exportParams(v, `{"name":"_type","valueString":"Patient"}`), false, "Parameters.parameter[1].name"},
		{"bad patient", "", exportParams(v, `{"name":"patient","valueReference":{"reference":"Group/g"}}`), false, "Parameters.parameter[1]"},
		{"patient and group", "", exportParams(v, `{"name":"patient","valueString":"Patient/a"}`, `{"name":"group","valueReference":{"reference":"Group/g"}}`), false, "group"},
		{"bad _since", "", exportParams(v, `{"name":"_since","valueInstant":"yesterday"}`), false, "Parameters.parameter[1]"},
		{"query parameter", "?_format=csv", exportParams(v), false, "_format"},
		{"unknown patient", "", exportParams(v, `{"name":"patient","valueString":"Patient/nobody"}`), false, "patient"},
	} {
		h := []string{"Content-Type", "application/fhir+json"}
		if !tc.noAsync {
			h = append(h, "Prefer", "respond-async")
		}
		res := e.do("POST", "/$viewdefinition-export"+tc.path, tc.body, h...)
		var oo struct {
			ResourceType string
			Issue        []struct{ Expression []string }
		}
		json.Unmarshal(res.body, &oo)
		if res.StatusCode != 400 || oo.ResourceType != "OperationOutcome" || len(oo.Issue) == 0 || !slices.Equal(oo.Issue[0].Expression, []string{tc.at}) {
			t.Errorf("%s: want 400 at %s, got %d %s", tc.name, tc.at, res.StatusCode, res.body)
		}
	}
}

// TestViewExportAccess: a view export shows rows only of resources the
// token could export — its tenants, its scopes' query filters — and a view
// of a type it cannot read is refused.
func TestViewExportAccess(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	putLabTenants(t, r.env)
	ids := func(tok, typ string, extra ...string) (int, []string) {
		t.Helper()
		h := bearer(tok)
		res := r.do("POST", "/$viewdefinition-export", exportParams(append([]string{
			viewParam("ids", `{"resource":"`+typ+`","select":[{"column":[{"name":"id","path":"id"}]}]}`),
			`{"name":"_format","valueCode":"csv"}`, `{"name":"header","valueBoolean":false}`}, extra...)...),
			append(h, "Prefer", "respond-async", "Content-Type", "application/fhir+json")...)
		if res.StatusCode != 202 {
			return res.StatusCode, nil
		}
		st := waitView(t, r.env, res.Header.Get("Content-Location"), h...)
		if st.str("status") != "completed" {
			t.Fatalf("%s: %v", typ, st.params)
		}
		var got []string
		for _, b := range viewFiles(t, r.env, st.outputs["ids"], h...) {
			got = append(got, sortedLines(b)...)
		}
		slices.Sort(got)
		return 202, got
	}
	a := r.token(t, "alice", "system/*.read access/tenantA.read")
	if _, got := ids(a, "Observation"); !slices.Equal(got, []string{"lab-a", "vit-a"}) {
		t.Errorf("tenant A's Observations: %q", got)
	}
	if _, got := ids(a, "Patient"); !slices.Equal(got, []string{"pa"}) {
		t.Errorf("tenant A's Patients: %q", got)
	}
	all := r.token(t, "all", "system/*.read access/*.read")
	if _, got := ids(all, "Observation", `{"name":"patient","valueString":"Patient/pb"}`); !slices.Equal(got, []string{"lab-b"}) {
		t.Errorf("patient pb's Observations: %q", got)
	}
	lab := r.token(t, "lab", "system/Observation.rs?category=laboratory system/Patient.rs access/*.read")
	if _, got := ids(lab, "Observation"); !slices.Equal(got, []string{"lab-a", "lab-b"}) {
		t.Errorf("through a laboratory-only scope: %q", got)
	}
	onlyPatients := r.token(t, "p", "system/Patient.read access/*.read")
	if status, _ := ids(onlyPatients, "Observation"); status != 403 {
		t.Errorf("a view of a type the token cannot read: %d", status)
	}
	// Another client's job is not found, whatever its token reads.
	res := r.do("POST", "/$viewdefinition-export", exportParams(viewParam("ids", obsView)), append(bearer(a), "Prefer", "respond-async")...)
	if res.StatusCode != 202 {
		t.Fatalf("kick-off: %d %s", res.StatusCode, res.body)
	}
	if other := r.do("GET", res.Header.Get("Content-Location"), nil, bearer(all)...); other.StatusCode != 404 {
		t.Errorf("another client's view export: %d %s", other.StatusCode, other.body)
	}
}
