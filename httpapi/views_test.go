package httpapi_test

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"
	"time"
)

const storedPatientView = `{"resourceType":"ViewDefinition","name":"patients","resource":"Patient","select":[{"column":[
 {"name":"id","path":"getResourceKey()","type":"string"},{"name":"family","path":"name.first().family","type":"string"}]}]}`

// TestStoredViews (issue 21): ViewDefinitions are stored at /ViewDefinition
// (create, read, update, list, delete), used by viewReference in
// $viewdefinition-run and $viewdefinition-export, and every mistake is a
// 4xx naming what was wrong.
func TestStoredViews(t *testing.T) {
	e := newEnv(t, envOpts{})
	put(t, e, `{"resourceType":"Patient","id":"a","name":[{"family":"Ng"}]}`)
	ct := []string{"Content-Type", "application/fhir+json"}

	res := e.do("PUT", "/ViewDefinition/pv", []byte(storedPatientView), ct...)
	if res.StatusCode != 201 || !strings.HasSuffix(res.Header.Get("Location"), "/ViewDefinition/pv") || res.Header.Get("ETag") != `W/"1"` {
		t.Fatalf("create: %d %v %s", res.StatusCode, res.Header, res.body)
	}
	res = e.do("PUT", "/ViewDefinition/pv", []byte(strings.Replace(storedPatientView, `"patients"`, `"people"`, 1)), ct...)
	if res.StatusCode != 200 || res.Header.Get("ETag") != `W/"2"` {
		t.Fatalf("update: %d %s", res.StatusCode, res.body)
	}
	got := e.do("GET", "/ViewDefinition/pv", nil).json(t)
	if got["id"] != "pv" || got["name"] != "people" || got["meta"].(map[string]any)["versionId"] != "2" || got["resourceType"] != "ViewDefinition" {
		t.Errorf("read: %v", got)
	}
	res = e.do("POST", "/ViewDefinition", []byte(obsViewStored), ct...)
	if res.StatusCode != 201 {
		t.Fatalf("create by POST: %d %s", res.StatusCode, res.body)
	}
	list := e.do("GET", "/ViewDefinition", nil).json(t)
	if list["type"] != "searchset" || list["total"] != float64(2) {
		t.Errorf("list: %v", list)
	}

	// viewReference in both operations.
	ref := `{"name":"viewReference","valueReference":{"reference":"ViewDefinition/pv"}}`
	res = e.do("POST", "/ViewDefinition/$viewdefinition-run?_format=csv", []byte(`{"resourceType":"Parameters","parameter":[`+ref+`]}`), ct...)
	if res.StatusCode != 200 || string(res.body) != "id,family\nPatient/a,Ng\n" {
		t.Errorf("run by reference: %d %q", res.StatusCode, res.body)
	}
	res = e.do("POST", "/$viewdefinition-export", exportParams(`{"name":"view","part":[`+strings.Replace(ref, "viewReference", "viewReference", 1)+`]}`, `{"name":"_format","valueCode":"csv"}`),
		append(ct, "Prefer", "respond-async")...)
	if res.StatusCode != 202 {
		t.Fatalf("export by reference: %d %s", res.StatusCode, res.body)
	}
	st := waitView(t, e, res.Header.Get("Content-Location"))
	if files := viewFiles(t, e, st.outputs["people"]); len(files) != 1 || string(files[0]) != "id,family\nPatient/a,Ng\n" {
		t.Errorf("export by reference: %v %q", st.outputs, files)
	}

	for _, tc := range []struct {
		name, method, path string
		body               string
		headers            []string
		status             int
		at                 string
	}{
		{"bad path", "PUT", "/ViewDefinition/x", `{"resourceType":"ViewDefinition","resource":"Patient","select":[{"column":[{"name":"a","path":"name.("}]}]}`, nil, 400, "ViewDefinition.select[0].column[0].path"},
		{"not a ViewDefinition", "PUT", "/ViewDefinition/x", `{"resourceType":"Patient"}`, nil, 400, "resourceType"},
		{"id mismatch", "PUT", "/ViewDefinition/x", strings.Replace(storedPatientView, `"name"`, `"id":"y","name"`, 1), nil, 400, "ViewDefinition.id"},
		{"bad id", "PUT", "/ViewDefinition/a_b", storedPatientView, nil, 400, "id"},
		{"If-Match", "PUT", "/ViewDefinition/pv", storedPatientView, []string{"If-Match", `W/"2"`}, 400, "If-Match"},
		{"search parameter", "GET", "/ViewDefinition?name=people", "", nil, 400, "name"},
		{"unknown", "GET", "/ViewDefinition/nope", "", nil, 404, ""},
		{"run with an unknown reference", "POST", "/ViewDefinition/$viewdefinition-run", `{"resourceType":"Parameters","parameter":[{"name":"viewReference","valueReference":{"reference":"ViewDefinition/nope"}}]}`, nil, 404, "Parameters.parameter[0]"},
	} {
		var body []byte
		if tc.body != "" {
			body = []byte(tc.body)
		}
		res := e.do(tc.method, tc.path, body, append(append([]string{}, ct...), tc.headers...)...)
		var oo struct {
			ResourceType string
			Issue        []struct{ Expression []string }
		}
		json.Unmarshal(res.body, &oo)
		if res.StatusCode != tc.status || oo.ResourceType != "OperationOutcome" || tc.at != "" && (len(oo.Issue) == 0 || !slices.Equal(oo.Issue[0].Expression, []string{tc.at})) {
			t.Errorf("%s: want %d at %q, got %d %s", tc.name, tc.status, tc.at, res.StatusCode, res.body)
		}
	}

	if res := e.do("DELETE", "/ViewDefinition/pv", nil); res.StatusCode != 204 {
		t.Fatalf("delete: %d %s", res.StatusCode, res.body)
	}
	if res := e.do("GET", "/ViewDefinition/pv", nil); res.StatusCode != 404 {
		t.Errorf("read after delete: %d", res.StatusCode)
	}
	if res := e.do("DELETE", "/ViewDefinition/pv", nil); res.StatusCode != 404 {
		t.Errorf("second delete: %d", res.StatusCode)
	}
}

const obsViewStored = `{"resourceType":"ViewDefinition","resource":"Observation","select":[{"column":[{"name":"id","path":"id"}]}]}`

// TestStoredViewsAccess: reading stored views needs the ViewDefinition read
// scope; writing them its write scope and, with tenancy on, a token bound to
// no tenant (a stored view is every tenant's).
func TestStoredViewsAccess(t *testing.T) {
	r := newAuthEnv(t, envOpts{noWorkers: true})
	ct := []string{"Content-Type", "application/fhir+json"}
	admin := r.token(t, "admin", "system/*.* access/*.*")
	if res := r.do("PUT", "/ViewDefinition/pv", []byte(storedPatientView), append(bearer(admin), ct...)...); res.StatusCode != 201 {
		t.Fatalf("admin create: %d %s", res.StatusCode, res.body)
	}
	for _, tc := range []struct {
		scope          string
		read, write    int
		runByReference int
	}{
		{"system/*.read access/tenantA.read", 200, 403, 200},
		{"system/*.read access/*.*", 200, 403, 200},
		{"system/*.* access/tenantA.*", 200, 403, 200},
		{"system/Patient.rs access/*.read", 403, 403, 403},
		{"system/ViewDefinition.rs system/Patient.rs access/*.read", 200, 403, 200},
		{"system/ViewDefinition.* system/Patient.rs access/*.*", 200, 200, 200},
		// No access/ scope under access-tags: no tenant's write access (and
		// a run finds no record it may see).
		{"system/*.*", 200, 403, 200},
		// A patient app (with a patient context): its patient/ scopes do
		// not reach the shared views.
		{"patient/*.* access/*.*", 200, 403, 200},
	} {
		var claims map[string]any
		if strings.HasPrefix(tc.scope, "patient/") {
			claims = map[string]any{"patient": "p1"}
		}
		minted, err := r.verifier.Mint("c", tc.scope, time.Minute, claims)
		if err != nil {
			t.Fatal(err)
		}
		tok := bearer(minted)
		if res := r.do("GET", "/ViewDefinition/pv", nil, tok...); res.StatusCode != tc.read {
			t.Errorf("%s: read %d, want %d", tc.scope, res.StatusCode, tc.read)
		}
		if res := r.do("GET", "/ViewDefinition", nil, tok...); res.StatusCode != tc.read {
			t.Errorf("%s: list %d, want %d", tc.scope, res.StatusCode, tc.read)
		}
		if res := r.do("PUT", "/ViewDefinition/pv", []byte(storedPatientView), append(tok, ct...)...); res.StatusCode != tc.write {
			t.Errorf("%s: write %d, want %d", tc.scope, res.StatusCode, tc.write)
		}
		if res := r.do("DELETE", "/ViewDefinition/other", nil, tok...); tc.write == 403 && res.StatusCode != 403 {
			t.Errorf("%s: delete %d, want 403", tc.scope, res.StatusCode)
		}
		res := r.do("POST", "/ViewDefinition/$viewdefinition-run", []byte(`{"resourceType":"Parameters","parameter":[{"name":"viewReference","valueReference":{"reference":"ViewDefinition/pv"}}]}`), append(tok, ct...)...)
		if res.StatusCode != tc.runByReference {
			t.Errorf("%s: run by reference %d, want %d: %s", tc.scope, res.StatusCode, tc.runByReference, res.body)
		}
	}
}
