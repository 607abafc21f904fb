package httpapi_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln"
)

// runParams is a $viewdefinition-run Parameters body with an inline view and
// extra parameters (JSON members of parameter[]).
func runParams(view string, extra ...string) []byte {
	ps := []string{`{"name":"viewResource","resource":` + view + `}`}
	ps = append(ps, extra...)
	return []byte(`{"resourceType":"Parameters","parameter":[` + strings.Join(ps, ",") + `]}`)
}

const patientView = `{"resourceType":"ViewDefinition","resource":"Patient","select":[{"column":[
 {"name":"id","path":"getResourceKey()","type":"string"},{"name":"family","path":"name.first().family","type":"string"},
 {"name":"active","path":"active","type":"boolean"}]}]}`

const obsView = `{"resource":"Observation","select":[{"column":[{"name":"id","path":"id"},
 {"name":"patient","path":"subject.getReferenceKey(Patient)"},{"name":"value","path":"value.ofType(Quantity).value","type":"decimal"}]}]}`

func sortedLines(b []byte) []string {
	l := strings.Split(strings.TrimSpace(string(b)), "\n")
	sort.Strings(l)
	return l
}

func TestViewRun(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true})
	put(t, e, `{"resourceType":"Patient","id":"a","active":true,"name":[{"family":"Ng, Jr"}]}`, `{"resourceType":"Patient","id":"b"}`,
		obs("o1", "a", `,"valueQuantity":{"value":1.50}`), obs("o2", "b", `,"valueQuantity":{"value":7}`), obs("o3", "a", ""))
	run := "/ViewDefinition/$viewdefinition-run"

	res := e.do("POST", run, runParams(patientView, `{"name":"_format","valueCode":"csv"}`), "Content-Type", "application/fhir+json")
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "text/csv" {
		t.Fatalf("csv: %d %s %s", res.StatusCode, res.Header.Get("Content-Type"), res.body)
	}
	if got := strings.Split(strings.TrimSpace(string(res.body)), "\n"); len(got) != 3 || got[0] != "id,family,active" ||
		!slices.Equal(sortedLines([]byte(strings.Join(got[1:], "\n"))), []string{`Patient/a,"Ng, Jr",true`, "Patient/b,,"}) {
		t.Errorf("csv body:\n%s", res.body)
	}

	// ndjson from the query string; patient narrows to the compartment.
	res = e.do("POST", run+"?_format=ndjson", runParams(obsView, `{"name":"patient","valueReference":{"reference":"Patient/a"}}`))
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("ndjson: %d %s", res.StatusCode, res.body)
	}
	if got := sortedLines(res.body); !slices.Equal(got, []string{`{"id":"o1","patient":"Patient/a","value":1.50}`, `{"id":"o3","patient":"Patient/a","value":null}`}) {
		t.Errorf("ndjson for patient a: %q", got)
	}

	// json (the default) with _limit.
	res = e.do("POST", run, runParams(obsView, `{"name":"_limit","valueInteger":2}`))
	var rows []map[string]any
	if err := json.Unmarshal(res.body, &rows); res.StatusCode != 200 || err != nil || len(rows) != 2 {
		t.Fatalf("json with _limit 2: %d %v %s", res.StatusCode, err, res.body)
	}
	res = e.do("POST", run, runParams(`{"resource":"Patient","where":[{"path":"id = 'zz'"}],"select":[{"column":[{"name":"id","path":"id"}]}]}`))
	if res.StatusCode != 200 || string(res.body) != "[]" {
		t.Errorf("no rows: %d %s", res.StatusCode, res.body)
	}

	// parquet: the file (DuckDB reads it back in view's TestParquetReadByDuckDB).
	res = e.do("POST", run+"?_format=parquet", runParams(obsView))
	if res.StatusCode != 200 || res.Header.Get("Content-Type") != "application/vnd.apache.parquet" ||
		!bytes.HasPrefix(res.body, []byte("PAR1")) || !bytes.HasSuffix(res.body, []byte("PAR1")) {
		t.Errorf("parquet: %d %s %.40q", res.StatusCode, res.Header.Get("Content-Type"), res.body)
	}

	for _, tc := range []struct {
		name string
		body []byte
		at   string
	}{
		{"text in an integer Parquet column", runParams(`{"resource":"Patient","select":[{"column":[{"name":"x","path":"id","type":"integer"}]}]}`,
			`{"name":"_format","valueCode":"parquet"}`), "ViewDefinition.select[0].column[0].type"},
		{"bad path", runParams(`{"resource":"Patient","select":[{"column":[{"name":"x","path":"name.("}]}]}`), "ViewDefinition.select[0].column[0].path"},
		{"no resource", runParams(`{"select":[{"column":[{"name":"x","path":"id"}]}]}`), "ViewDefinition.resource"},
		{"not an R4 type", runParams(`{"resource":"Frobnitz","select":[{"column":[{"name":"x","path":"id"}]}]}`), "ViewDefinition.resource"},
		{"canonical viewReference", []byte(`{"resourceType":"Parameters","parameter":[{"name":"viewReference","valueReference":{"reference":"http://example.org/ViewDefinition/v|1"}}]}`), "Parameters.parameter[0]"},
		{"no view", []byte(`{"resourceType":"Parameters","parameter":[]}`), "Parameters.parameter"},
		{"not Parameters", []byte(`{"resourceType":"Patient"}`), "resourceType"},
		{"bad format", runParams(patientView, `{"name":"_format","valueCode":"xml"}`), "Parameters.parameter[1]"},
		{"bad limit", runParams(patientView, `{"name":"_limit","valueInteger":0}`), "Parameters.parameter[1]"},
		{"group", runParams(patientView, `{"name":"group","valueReference":{"reference":"Group/g"}}`), "Parameters.parameter[1]"},
		{"unknown parameter", runParams(patientView, `{"name":"frob","valueString":"x"}`), "Parameters.parameter[1].name"},
		// Found only in the data: every Patient gives two values for a
		// column without collection: true.
		{"several values", runParams(`{"resource":"Patient","select":[{"column":[{"name":"g","path":"(id | 'x')"}]}]}`), "ViewDefinition.select[0].column[0].path"},
	} {
		res := e.do("POST", run, tc.body)
		if res.StatusCode != 400 {
			t.Errorf("%s: %d %s", tc.name, res.StatusCode, res.body)
			continue
		}
		var oo struct {
			ResourceType string
			Issue        []struct{ Expression []string }
		}
		json.Unmarshal(res.body, &oo)
		if oo.ResourceType != "OperationOutcome" || len(oo.Issue) == 0 || !slices.Equal(oo.Issue[0].Expression, []string{tc.at}) {
			t.Errorf("%s: want an OperationOutcome at %s, got %s", tc.name, tc.at, res.body)
		}
	}
	if res := e.do("POST", run, runParams(patientView), "Content-Type", "text/plain"); res.StatusCode != 415 {
		t.Errorf("text/plain body: %d", res.StatusCode)
	}
}

// putLabTenants stores tenant A's patient pa with a laboratory and a
// vital-signs Observation, and tenant B's pb with a laboratory one.
func putLabTenants(t *testing.T, e *env) {
	t.Helper()
	sec := func(tenant string) string {
		return fmt.Sprintf(`,"meta":{"security":[{"system":%q,"code":%q}]}`, kiln.AccessSystem, tenant)
	}
	cat := func(c string) string {
		return `,"category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"` + c + `"}]}]`
	}
	put(t, e, `{"resourceType":"Patient","id":"pa"`+sec("tenantA")+`}`, `{"resourceType":"Patient","id":"pb"`+sec("tenantB")+`}`,
		obs("lab-a", "pa", sec("tenantA")+cat("laboratory")), obs("vit-a", "pa", sec("tenantA")+cat("vital-signs")),
		obs("lab-b", "pb", sec("tenantB")+cat("laboratory")))
}

// TestViewRunAccess: a view shows only rows of resources the caller could
// read through search: the type scope, the tenant's access tags and the
// scopes' query filters.
func TestViewRunAccess(t *testing.T) {
	r := newAuthEnv(t, envOpts{noWorkers: true})
	putLabTenants(t, r.env)
	ids := func(tok, view string, extra ...string) (int, []string) {
		t.Helper()
		res := r.do("POST", "/ViewDefinition/$viewdefinition-run?_format=csv&header=false",
			runParams(`{"resource":"`+view+`","select":[{"column":[{"name":"id","path":"id"}]}]}`, extra...), bearer(tok)...)
		if res.StatusCode != 200 {
			return res.StatusCode, nil
		}
		return 200, sortedLines(res.body)
	}
	a := r.token(t, "alice", "system/*.read access/tenantA.read")
	if _, got := ids(a, "Observation"); !slices.Equal(got, []string{"lab-a", "vit-a"}) {
		t.Errorf("tenant A's Observations: %q", got)
	}
	if _, got := ids(a, "Patient"); !slices.Equal(got, []string{"pa"}) {
		t.Errorf("tenant A's Patients: %q", got)
	}
	// Another tenant's patient: its compartment shows nothing to A.
	if status, got := ids(a, "Observation", `{"name":"patient","valueString":"Patient/pb"}`); status != 200 || len(got) != 1 || got[0] != "" {
		t.Errorf("A asking for B's patient: %d %q", status, got)
	}
	all := r.token(t, "all", "system/*.read access/*.read")
	if _, got := ids(all, "Observation"); !slices.Equal(got, []string{"lab-a", "lab-b", "vit-a"}) {
		t.Errorf("all Observations: %q", got)
	}
	lab := r.token(t, "lab", "system/Observation.rs?category=laboratory system/Patient.rs access/*.read")
	if _, got := ids(lab, "Observation"); !slices.Equal(got, []string{"lab-a", "lab-b"}) {
		t.Errorf("through a laboratory-only scope: %q", got)
	}
	onlyPatients := r.token(t, "p", "system/Patient.read access/*.read")
	if status, _ := ids(onlyPatients, "Observation"); status != 403 {
		t.Errorf("a view of a type the token cannot read: %d", status)
	}
}

// TestViewRunCutsOffLateError: an error found after the response began (more
// than a megabyte of rows in) breaks the response rather than ending it as if
// the table were whole.
func TestViewRunCutsOffLateError(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true})
	long := strings.Repeat("n", 1000)
	var bodies []string
	for i := range 1200 {
		bodies = append(bodies, fmt.Sprintf(`{"resourceType":"Patient","id":"p%04d","name":[{"family":"%s"}]}`, i, long))
	}
	put(t, e, bodies...)
	put(t, e, `{"resourceType":"Patient","id":"zz","name":[{"family":"a"},{"family":"b"}]}`)
	body := runParams(`{"resource":"Patient","select":[{"column":[{"name":"f","path":"name.family"}]}]}`, `{"name":"_format","valueCode":"csv"}`)
	res, err := http.Post(e.base+"/ViewDefinition/$viewdefinition-run", "application/fhir+json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if res.StatusCode != 200 || err == nil {
		t.Fatalf("status %d, read %d bytes, error %v: want 200 and a broken body", res.StatusCode, len(b), err)
	}
	// Without the late error the same view runs to the end.
	put(t, e, `{"resourceType":"Patient","id":"zz","name":[{"family":"a"}]}`)
	if r := e.do("POST", "/ViewDefinition/$viewdefinition-run", body); r.StatusCode != 200 || strings.Count(string(r.body), "\n") != 1202 {
		t.Fatalf("whole run: %d, %d lines", r.StatusCode, strings.Count(string(r.body), "\n"))
	}
}
