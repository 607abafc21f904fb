package httpapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/httpapi"
	"github.com/kiln-fhir/kiln/storetest"
)

const syntheaGroup = "d9f31445-f448-48c0-af57-295c005e07df"

// TestExportSynthea100 reproduces the ONC Inferno Bulk Data checks for the
// three export levels, plus Kiln's own rules, on the 100-patient Synthea set.
func TestExportSynthea100(t *testing.T) {
	e := newEnv(t, envOpts{})
	e.load(dataDir(t, "synthea-r4-100"))
	counts, err := e.db.Counts(context.Background())
	if err != nil {
		t.Fatal(err)
	}

	t.Run("Metadata", func(t *testing.T) {
		r := e.do("GET", "/metadata", nil)
		m := r.json(t)
		if r.StatusCode != 200 || !slices.Contains(toStrings(m["instantiates"]), "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data") {
			t.Fatalf("metadata: %d %v", r.StatusCode, m["instantiates"])
		}
		rest := m["rest"].([]any)[0].(map[string]any)
		if op := rest["operation"].([]any)[0].(map[string]any); op["name"] != "export" {
			t.Fatalf("system operation %v", op)
		}
		for _, res := range rest["resource"].([]any) {
			rm := res.(map[string]any)
			if rm["type"] == "Patient" || rm["type"] == "Group" {
				if ops, _ := rm["operation"].([]any); len(ops) != 1 || ops[0].(map[string]any)["name"] != "export" {
					t.Fatalf("%s declares operations %v", rm["type"], ops)
				}
			}
		}
	})

	for _, level := range []struct{ name, path string }{
		{"System", "/$export"},
		{"Patient", "/Patient/$export"},
		{"Group", "/Group/" + syntheaGroup + "/$export"},
	} {
		t.Run(level.name, func(t *testing.T) {
			loc := e.kickOff("GET", level.path, nil)
			r, m := e.wait(loc)
			if r.StatusCode != 200 || !strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") {
				t.Fatalf("complete status: %d %q", r.StatusCode, r.Header.Get("Content-Type"))
			}
			if r.Header.Get("Expires") == "" {
				t.Error("manifest without Expires")
			}
			var keys map[string]json.RawMessage
			json.Unmarshal(r.body, &keys)
			for _, k := range []string{"transactionTime", "request", "requiresAccessToken", "output", "error", "errors", "deleted"} {
				if _, ok := keys[k]; !ok {
					t.Errorf("manifest lacks %s", k)
				}
			}
			if m.Request != e.base+level.path {
				t.Errorf("request %q", m.Request)
			}
			got, lines := e.exportedLines(m)
			referenced := map[string]int{}
			for ref := range referencesIn(lines) {
				referenced[strings.Split(ref, "/")[0]]++
			}
			if len(got["Patient"]) < 2 {
				t.Fatalf("%d Patients", len(got["Patient"]))
			}
			for typ, ids := range got {
				if n := len(slices.Compact(slices.Sorted(slices.Values(ids)))); n != len(ids) {
					t.Errorf("%s: %d lines but %d distinct ids", typ, len(ids), n)
				}
				want := counts[typ]
				if level.name != "System" && !fhir.R4().InCompartment(typ) && typ != "Device" {
					// Outside the compartment, only what the patients' data references.
					want = int64(referenced[typ])
				}
				if int64(len(ids)) != want {
					t.Errorf("%s export of %s: %d, want %d", level.name, typ, len(ids), want)
				}
			}
			if len(got) != len(counts) {
				t.Errorf("%s export has %d types, store %d", level.name, len(got), len(counts))
			}
			// One file downloaded gzip'd equals its plain form.
			plain, zipped := e.lines(m.Output[0].URL, false), e.lines(m.Output[0].URL, true)
			if !slices.EqualFunc(plain, zipped, func(a, b []byte) bool { return string(a) == string(b) }) {
				t.Error("gzip download differs")
			}
		})
	}

	t.Run("GroupPatientsAreMembers", func(t *testing.T) {
		m := e.mustComplete(e.kickOff("GET", "/Group/"+syntheaGroup+"/$export?_type=Patient", nil))
		got := e.exported(m)["Patient"]
		var g struct {
			Member []struct{ Entity struct{ Reference string } }
		}
		json.Unmarshal(e.do("GET", "/Group/"+syntheaGroup, nil).body, &g)
		var want []string
		for _, mb := range g.Member {
			want = append(want, strings.TrimPrefix(mb.Entity.Reference, "Patient/"))
		}
		sort.Strings(got)
		sort.Strings(want)
		if !slices.Equal(got, want) {
			t.Fatalf("exported %d patients, group has %d", len(got), len(want))
		}
	})

	t.Run("OutputFormats", func(t *testing.T) {
		for _, f := range []string{"application/fhir+ndjson", "application/ndjson", "ndjson"} {
			loc := e.kickOff("GET", "/$export?_type=Patient&_outputFormat="+url.QueryEscape(f), nil)
			if r := e.do("DELETE", loc, nil); r.StatusCode != http.StatusAccepted {
				t.Fatalf("DELETE after %s: %d %s", f, r.StatusCode, r.body)
			}
		}
	})

	t.Run("Since", func(t *testing.T) {
		since := time.Now().Add(-time.Hour).UTC().Format("2006-01-02T15:04:05Z")
		loc := e.kickOff("GET", "/$export?_type=Patient&_since="+since, nil)
		m := e.mustComplete(loc)
		if len(e.exported(m)["Patient"]) != 100 {
			t.Fatal("_since an hour ago should include the freshly loaded patients")
		}
		m = e.mustComplete(e.kickOff("GET", "/$export?_type=Patient&_since="+url.QueryEscape(m.TransactionTime), nil))
		if len(m.Output) != 0 {
			t.Fatalf("_since the last transactionTime: %+v", m.Output)
		}
	})

	t.Run("HelixSeedExample", func(t *testing.T) {
		// The seed's example: POST with query parameters, a Content-Type and no body.
		loc := e.kickOff("POST", "/$export?_since=2023-10-10&_type=Patient", nil, "Content-Type", "application/fhir+json")
		r, m := e.wait(loc)
		if r.StatusCode != 200 || r.Header.Get("X-Progress") != "completed" {
			t.Fatalf("status %d X-Progress %q", r.StatusCode, r.Header.Get("X-Progress"))
		}
		if len(m.Output) != 1 || m.Output[0].Type != "Patient" || m.Errors == nil || len(m.Errors) != len(m.Error) {
			t.Fatalf("manifest %+v", m)
		}
		// The seed's own spelling of _type in its flow description.
		m = e.mustComplete(e.kickOff("POST", "/Patient/$export?_since=2023-10-10&type=Patient&patient=patient/"+firstPatient(t, e), nil))
		if len(m.Output) != 1 || m.Output[0].Count != 1 {
			t.Fatalf("type=Patient&patient=patient/x: %+v", m.Output)
		}
	})

	t.Run("TypeAndElements", func(t *testing.T) {
		m := e.mustComplete(e.kickOff("GET", "/Patient/$export?_type=Patient,Condition&_elements=Patient.gender,Condition.code", nil))
		if len(m.Output) != 2 {
			t.Fatalf("outputs %+v", m.Output)
		}
		for _, it := range m.Output {
			for _, l := range e.lines(it.URL, false) {
				var r map[string]any
				json.Unmarshal(l, &r)
				allowed := map[string]bool{"resourceType": true, "id": true, "meta": true, "gender": true, "code": true, "subject": true}
				for k := range r {
					if !allowed[k] {
						t.Fatalf("%s line keeps %s: %s", it.Type, k, l)
					}
				}
				if !strings.Contains(string(l), `"SUBSETTED"`) {
					t.Fatalf("no SUBSETTED tag: %s", l)
				}
			}
		}
	})

	t.Run("PostParametersAndForm", func(t *testing.T) {
		p1, p2 := patientIDs(t, e)[0], patientIDs(t, e)[1]
		body := fmt.Sprintf(`{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"},{"name":"patient","valueReference":{"reference":"Patient/%s"}},{"name":"patient","valueReference":{"reference":"Patient/%s"}}]}`, p1, p2)
		m := e.mustComplete(e.kickOff("POST", "/Patient/$export", []byte(body), "Content-Type", "application/fhir+json"))
		if ids := e.exported(m)["Patient"]; len(ids) != 2 {
			t.Fatalf("Parameters body: %v", ids)
		}
		form := "_type=Patient&patient=" + p1
		m = e.mustComplete(e.kickOff("POST", "/Patient/$export", []byte(form), "Content-Type", "application/x-www-form-urlencoded"))
		if ids := e.exported(m)["Patient"]; len(ids) != 1 || ids[0] != p1 {
			t.Fatalf("form body: %v", ids)
		}
	})

	t.Run("BadKickOffs", func(t *testing.T) {
		p := patientIDs(t, e)[0]
		cases := []struct {
			method, path, body, ctype string
			status                    int
			want                      string
		}{
			{"GET", "/$export?_type=Pateint", "", "", 400, "@_type"},
			{"GET", "/$export?_outputFormat=text/csv", "", "", 400, "@_outputFormat"},
			{"GET", "/$export?_since=yesterday", "", "", 400, "@_since"},
			{"GET", "/$export?_until=2020-13-01", "", "", 400, "@_until"},
			{"GET", "/$export?patient=" + p, "", "", 400, "not allowed on a system-level"},
			{"GET", "/Patient/$export?patient=Patient/nobody", "", "", 400, "Patient/nobody does not exist"},
			{"GET", "/Patient/$export?patient=Observation/1", "", "", 400, "@patient"},
			{"GET", "/$export?_elements=Patient.nothing", "", "", 400, "@_elements"},
			{"GET", "/$export?includeAssociatedData=Everything", "", "", 400, "@includeAssociatedData"},
			{"GET", "/$export?_typeFilter=Patient%3Fbogus%3D1", "", "", 400, "@_typeFilter"},
			{"GET", "/$export?_typeFilter=Patient%3F_count%3D1", "", "", 400, "result parameter"},
			{"GET", "/$export?_typeFilter=Patient%3F_sort%3Dname", "", "", 400, "result parameter"},
			{"GET", "/$export?_type=Patient&_typeFilter=Observation%3Fstatus%3Dfinal", "", "", 400, "not in _type"},
			{"GET", "/$export?_typeFilter=Observation%3Fdate%3Dge2020-13", "", "", 400, "@_typeFilter"},
			{"GET", "/$export?bogus=1", "", "", 400, "@bogus"},
			{"GET", "/$export?patientReferenceBatchSize=0", "", "", 400, "from 1 to 10000"},
			{"GET", "/$export?patientReferenceBatchSize=10001", "", "", 400, "@patientReferenceBatchSize"},
			{"GET", "/$export?fetchResourceBatchSize=abc", "", "", 400, "@fetchResourceBatchSize"},
			{"GET", "/$export?uploadPartSize=40", "", "", 400, "from 5242880 to 5368709120"},
			{"GET", "/$export?uploadPartSize=5368709121", "", "", 400, "@uploadPartSize"},
			{"GET", "/$export?loglevel=loud", "", "", 400, "@loglevel"},
			{"GET", "/$export?requestsMemory=lots", "", "", 400, "@requestsMemory"},
			{"GET", "/$export?requestsMemory=4G&limitsMemory=2G", "", "", 400, "@limitsMemory"},
			{"GET", "/$export?ttlSecondsAfterFinished=-1", "", "", 400, "@ttlSecondsAfterFinished"},
			{"GET", "/$export?ttlSecondsAfterFinished=1.5", "", "", 400, "@ttlSecondsAfterFinished"},
			{"GET", "/$export?_since=2020-01-02&_until=2020-01-01", "", "", 400, "@_until"},
			{"GET", "/Group/nope/$export", "", "", 404, "Group/nope does not exist"},
			{"POST", "/$export", `{"resourceType":"Patient"}`, "application/fhir+json", 400, "Parameters"},
			{"POST", "/$export", `{"resourceType":"Parameters","parameter":[{"name":"_type"}]}`, "application/fhir+json", 400, "exactly one value"},
			{"POST", "/$export", `not json`, "application/fhir+json", 400, "not a JSON object"},
			{"POST", "/$export", `a,b`, "text/csv", 415, "Content-Type"},
		}
		for _, c := range cases {
			var body []byte
			if c.body != "" {
				body = []byte(c.body)
			}
			r := e.do(c.method, c.path, body, "Content-Type", c.ctype)
			if r.StatusCode != c.status {
				t.Errorf("%s %s: %d, want %d: %s", c.method, c.path, r.StatusCode, c.status, r.body)
				continue
			}
			if txt := r.outcomeText(t); !strings.Contains(txt, c.want) {
				t.Errorf("%s %s: outcome %q lacks %q", c.method, c.path, txt, c.want)
			}
		}
		if r := e.do("GET", "/$export", nil, "Accept", "application/xml"); r.StatusCode != 400 {
			t.Errorf("Accept: application/xml: %d", r.StatusCode)
		}
	})

	t.Run("LenientIgnoresIntoErrorFile", func(t *testing.T) {
		loc := e.kickOff("GET", "/$export?_type=Patient&bogus=1&_typeFilter=Patient%3Fnickname%3Dx&_typeFilter=Observation%3Fstatus%3Dfinal", nil, "Prefer", "respond-async, handling=lenient")
		m := e.mustComplete(loc)
		if len(m.Error) != 1 || m.Error[0].Type != "OperationOutcome" || m.Error[0].Count != 3 {
			t.Fatalf("error files %+v", m.Error)
		}
		var text []string
		for _, l := range e.lines(m.Error[0].URL, false) {
			if !strings.Contains(string(l), `"resourceType":"OperationOutcome"`) {
				t.Fatalf("error line %s", l)
			}
			text = append(text, string(l))
		}
		if !strings.Contains(strings.Join(text, "\n"), "_typeFilter on Observation, which is not in _type") {
			t.Errorf("the filter on a type outside _type is not in the error file: %v", text)
		}
		if len(m.Output) != 1 {
			t.Fatalf("output %+v", m.Output)
		}
	})

	t.Run("TypeFilter", func(t *testing.T) {
		// The ids a search with the same query returns, following next links.
		search := func(typ, query string) []string {
			var ids []string
			next := e.base + "/" + typ + "?" + query + "&_count=1000"
			for next != "" {
				b := e.do("GET", next, nil).json(t)
				next = ""
				for _, l := range b["link"].([]any) {
					if lm := l.(map[string]any); lm["relation"] == "next" {
						next = lm["url"].(string)
					}
				}
				for _, en := range b["entry"].([]any) {
					ids = append(ids, en.(map[string]any)["resource"].(map[string]any)["id"].(string))
				}
			}
			sort.Strings(ids)
			return ids
		}
		lab := search("Observation", "category=laboratory&date=ge2015-01-01")
		vitals := search("Observation", "category=vital-signs&value-quantity=gt100")
		active := search("MedicationRequest", "status=active")
		if len(lab) == 0 || len(vitals) == 0 || len(active) == 0 {
			t.Fatalf("searches found %d, %d, %d", len(lab), len(vitals), len(active))
		}
		either := slices.Compact(slices.Sorted(slices.Values(append(append([]string{}, lab...), vitals...))))
		tf := url.QueryEscape("Observation?category=laboratory&date=ge2015-01-01") + "&_typeFilter=" +
			url.QueryEscape("Observation?category=vital-signs&value-quantity=gt100") + "&_typeFilter=" + url.QueryEscape("MedicationRequest?status=active")
		for _, path := range []string{"/$export", "/Patient/$export", "/Group/" + syntheaGroup + "/$export"} {
			m := e.mustComplete(e.kickOff("GET", path+"?_type=Observation,MedicationRequest,Patient&_typeFilter="+tf, nil))
			got := e.exported(m)
			if o := slices.Sorted(slices.Values(got["Observation"])); !slices.Equal(o, either) {
				t.Errorf("%s: %d Observations, the two searches ORed give %d", path, len(o), len(either))
			}
			if mr := slices.Sorted(slices.Values(got["MedicationRequest"])); !slices.Equal(mr, active) {
				t.Errorf("%s: %d MedicationRequests, search gives %d", path, len(mr), len(active))
			}
			if int64(len(got["Patient"])) != counts["Patient"] {
				t.Errorf("%s: unfiltered Patients %d", path, len(got["Patient"]))
			}
		}
		// The v2 form: one parameter, a comma-joined list of URL-encoded queries.
		joined := url.QueryEscape(url.QueryEscape("MedicationRequest?status=active") + "," + url.QueryEscape("Observation?category=laboratory&date=ge2015-01-01"))
		m := e.mustComplete(e.kickOff("GET", "/$export?_type=Observation,MedicationRequest&_typeFilter="+joined, nil))
		got := e.exported(m)
		if len(got["Observation"]) != len(lab) || len(got["MedicationRequest"]) != len(active) {
			t.Errorf("comma-joined _typeFilter: %d Observations (want %d), %d MedicationRequests (want %d)", len(got["Observation"]), len(lab), len(got["MedicationRequest"]), len(active))
		}
	})

	t.Run("UnknownAndCancelled", func(t *testing.T) {
		r := e.do("GET", "/$export/no-such-job", nil)
		if r.StatusCode != 404 || !strings.Contains(r.outcomeText(t), "not known") {
			t.Fatalf("unknown job: %d %s", r.StatusCode, r.body)
		}
		loc := e.kickOff("GET", "/$export", nil)
		if r := e.do("DELETE", loc, nil); r.StatusCode != http.StatusAccepted {
			t.Fatalf("cancel: %d", r.StatusCode)
		}
		r = e.do("GET", loc, nil)
		if r.StatusCode != 404 {
			t.Fatalf("after cancel: %d", r.StatusCode)
		}
		r.outcomeText(t)
		if r := e.do("DELETE", loc, nil); r.StatusCode != 404 {
			t.Fatalf("second cancel: %d", r.StatusCode)
		}
		id := loc[strings.LastIndex(loc, "/")+1:]
		if _, err := os.Stat(filepath.Join(e.dir, "exports", id)); !os.IsNotExist(err) {
			t.Fatalf("files of a cancelled job remain: %v", err)
		}
		// Deleting a finished job removes its files too.
		m := e.mustComplete(e.kickOff("GET", "/$export?_type=Patient", nil))
		e.do("DELETE", strings.Split(m.Output[0].URL, "/file/")[0], nil)
		if r := e.do("GET", m.Output[0].URL, nil); r.StatusCode != 404 {
			t.Fatalf("file of a deleted job: %d", r.StatusCode)
		}
	})
}

var refPattern = regexp.MustCompile(`"reference":"([A-Za-z]+/[A-Za-z0-9.\-]+)"`)

// referencesIn lists the distinct Type/id references in lines.
func referencesIn(lines [][]byte) map[string]bool {
	out := map[string]bool{}
	for _, l := range lines {
		for _, m := range refPattern.FindAllSubmatch(l, -1) {
			out[string(m[1])] = true
		}
	}
	return out
}

func toStrings(v any) []string {
	var out []string
	for _, x := range v.([]any) {
		out = append(out, x.(string))
	}
	return out
}

func patientIDs(t *testing.T, e *env) []string {
	t.Helper()
	page, err := e.db.Search(context.Background(), kiln.SearchQuery{Type: "Patient", Count: 1000})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, r := range page.Resources {
		ids = append(ids, r.ID)
	}
	sort.Strings(ids)
	return ids
}

func firstPatient(t *testing.T, e *env) string { return patientIDs(t, e)[0] }

func put(t *testing.T, e *env, bodies ...string) {
	t.Helper()
	var ws []kiln.Write
	for _, b := range bodies {
		ws = append(ws, storetest.Put(t, b))
	}
	if _, err := e.db.Write(context.Background(), ws); err != nil {
		t.Fatal(err)
	}
}

func obs(id, subject string, extra string) string {
	return fmt.Sprintf(`{"resourceType":"Observation","id":%q,"status":"final","code":{"text":"x"},"subject":{"reference":"Patient/%s"}%s}`, id, subject, extra)
}

// TestOnceAcrossPatients: a resource in several patients' compartments is
// exported once, whatever the patient batches.
func TestOnceAcrossPatients(t *testing.T) {
	e := newEnv(t, envOpts{})
	put(t, e, `{"resourceType":"Patient","id":"a"}`, `{"resourceType":"Patient","id":"b"}`, `{"resourceType":"Patient","id":"c"}`,
		obs("o-a", "a", ""), obs("o-shared", "c", `,"performer":[{"reference":"Patient/a"},{"reference":"Patient/b"},{"reference":"Practitioner/dr"}]`),
		`{"resourceType":"Practitioner","id":"dr"}`, `{"resourceType":"Practitioner","id":"other"}`,
		`{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/a"}},{"entity":{"reference":"Patient/c"}},{"entity":{"reference":"Patient/b"},"inactive":true}]}`)
	for _, path := range []string{"/Patient/$export?patientReferenceBatchSize=1", "/Patient/$export?patientReferenceBatchSize=2&fetchResourceBatchSize=1", "/Group/g/$export?patientReferenceBatchSize=1"} {
		got := e.exported(e.mustComplete(e.kickOff("GET", path, nil)))
		if obs := slices.Sorted(slices.Values(got["Observation"])); !slices.Equal(obs, []string{"o-a", "o-shared"}) {
			t.Errorf("%s: observations %v", path, obs)
		}
		if !slices.Equal(got["Practitioner"], []string{"dr"}) {
			t.Errorf("%s: practitioners %v (only the referenced one belongs)", path, got["Practitioner"])
		}
	}
	got := e.exported(e.mustComplete(e.kickOff("GET", "/Group/g/$export?_type=Patient", nil)))
	if p := slices.Sorted(slices.Values(got["Patient"])); !slices.Equal(p, []string{"a", "c"}) {
		t.Errorf("group export patients %v (b is inactive)", p)
	}
}

// TestConsistentSnapshot: writes and deletes that land while an export runs
// do not show in it; a _since export lists deletes.
func TestConsistentSnapshot(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true})
	put(t, e, `{"resourceType":"Patient","id":"a","gender":"female"}`, obs("o1", "a", ""), obs("o2", "a", ""))
	before, _ := e.db.SnapshotTime(context.Background())
	put(t, e, obs("o3", "a", ""))
	locs := []string{e.kickOff("GET", "/$export", nil), e.kickOff("GET", "/Patient/$export", nil)}
	r := e.do("GET", locs[0], nil)
	if r.StatusCode != 202 || r.Header.Get("X-Progress") != "accepted" {
		t.Fatalf("before workers run: %d %q", r.StatusCode, r.Header.Get("X-Progress"))
	}
	// The export is accepted; now the data changes under it.
	put(t, e, `{"resourceType":"Patient","id":"a","gender":"male"}`, obs("o-new", "a", ""))
	if _, err := e.db.Write(context.Background(), []kiln.Write{{Kind: kiln.Delete, Type: "Observation", ID: "o1"}}); err != nil {
		t.Fatal(err)
	}
	e.startWorkers()
	for _, loc := range locs {
		m := e.mustComplete(loc)
		got := e.exported(m)
		if o := slices.Sorted(slices.Values(got["Observation"])); !slices.Equal(o, []string{"o1", "o2", "o3"}) {
			t.Errorf("observations as of transactionTime: %v", o)
		}
		for _, it := range m.Output {
			if it.Type == "Patient" {
				if l := e.lines(it.URL, false); !strings.Contains(string(l[0]), `"gender":"female"`) {
					t.Errorf("patient as of transactionTime: %s", l[0])
				}
			}
		}
	}
	// An incremental export since "before": o3 and the new versions, and o1's deletion.
	for _, path := range []string{"/$export", "/Patient/$export", "/Patient/$export?patient=a"} {
		m := e.mustComplete(e.kickOff("GET", path+sep(path)+"_since="+url.QueryEscape(before.Format(time.RFC3339Nano)), nil))
		got := e.exported(m)
		if o := slices.Sorted(slices.Values(got["Observation"])); !slices.Equal(o, []string{"o-new", "o3"}) {
			t.Errorf("%s _since: observations %v", path, o)
		}
		if len(m.Deleted) != 1 || m.Deleted[0].Count != 1 {
			t.Fatalf("%s _since: deleted %+v", path, m.Deleted)
		}
		l := e.lines(m.Deleted[0].URL, false)
		var b struct {
			ResourceType, Type string
			Entry              []struct{ Request struct{ Method, URL string } }
		}
		json.Unmarshal(l[0], &b)
		if b.ResourceType != "Bundle" || b.Type != "transaction" || b.Entry[0].Request.Method != "DELETE" || b.Entry[0].Request.URL != "Observation/o1" {
			t.Errorf("%s deleted line %s", path, l[0])
		}
	}
}

func sep(path string) string {
	if strings.Contains(path, "?") {
		return "&"
	}
	return "?"
}

// TestRestartRecovery: a server stopped mid-export finishes the job after a
// restart with exactly the expected lines: no duplicates, no gaps.
func TestRestartRecovery(t *testing.T) {
	dir := t.TempDir()
	// A short lease: on PostgreSQL the dead worker's units come back when it runs out.
	e := newEnv(t, envOpts{dir: dir, noWorkers: true, exportCfg: export.Config{UnitSize: 1000, Lease: time.Second}})
	e.load(dataDir(t, "synthea-r4-100"))
	counts, _ := e.db.Counts(context.Background())
	loc := e.kickOff("GET", "/$export", nil)
	id := loc[strings.LastIndex(loc, "/")+1:]
	// A worker claims units and dies: one unit is left running with a half-written part.
	for range 3 {
		u, err := e.db.ClaimUnit(context.Background(), time.Second)
		if err != nil || u == nil {
			t.Fatalf("claim: %v %v", u, err)
		}
		os.MkdirAll(filepath.Join(dir, "exports", id), 0o700)
		os.WriteFile(filepath.Join(dir, "exports", id, fmt.Sprintf("%06d-output-%s-001.ndjson", u.Seq, u.Type)), []byte("{\"torn"), 0o600)
	}
	e.close()

	// Restart on the same folder.
	e2 := newEnv(t, envOpts{dir: dir, exportCfg: export.Config{UnitSize: 1000, Lease: time.Second}})
	m := e2.mustComplete(e2.base + "/$export/" + id)
	got := e2.exported(m)
	for typ, n := range counts {
		ids := got[typ]
		if int64(len(ids)) != n || len(slices.Compact(slices.Sorted(slices.Values(ids)))) != len(ids) {
			t.Errorf("%s after restart: %d lines, store has %d", typ, len(ids), n)
		}
	}
}

// TestLimits: too many running exports get 429 with Retry-After; polling too
// fast gets 429; files split at the configured size.
func TestLimits(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true, exportCfg: export.Config{MaxActiveJobs: 2, MaxActiveJobsPerOwner: 1, MaxFileResources: 3},
		httpCfg: httpapi.Config{RetryAfter: 30, PollBurst: 2}})
	put(t, e, `{"resourceType":"Patient","id":"a"}`, `{"resourceType":"Patient","id":"b"}`, `{"resourceType":"Patient","id":"c"}`,
		`{"resourceType":"Patient","id":"d"}`, `{"resourceType":"Patient","id":"e"}`, `{"resourceType":"Patient","id":"f"}`, `{"resourceType":"Patient","id":"g"}`)
	loc := e.kickOff("GET", "/$export", nil)
	r := e.do("GET", "/$export", nil)
	if r.StatusCode != 429 || r.Header.Get("Retry-After") == "" {
		t.Fatalf("second export: %d %q", r.StatusCode, r.Header.Get("Retry-After"))
	}
	var last int
	for range 5 {
		last = e.do("GET", loc, nil).StatusCode
	}
	if last != 429 {
		t.Fatalf("rapid polling ended with %d", last)
	}
	e.startWorkers()
	time.Sleep(100 * time.Millisecond)
	deadline := time.Now().Add(30 * time.Second)
	for {
		j, err := e.svc.Job(context.Background(), loc[strings.LastIndex(loc, "/")+1:])
		if err != nil {
			t.Fatal(err)
		}
		if j.State == kiln.JobCompleted {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("export did not finish")
		}
		time.Sleep(20 * time.Millisecond)
	}
	r2, m := e.wait(loc)
	if r2.StatusCode != 200 {
		t.Fatalf("status %d", r2.StatusCode)
	}
	var n int
	for _, it := range m.Output {
		if it.Count > 3 {
			t.Fatalf("file over the split limit: %+v", it)
		}
		n += it.Count
	}
	if len(m.Output) != 3 || n != 7 {
		t.Fatalf("7 patients split by 3: %+v", m.Output)
	}
}

// TestSystemExport615: a full system export of the 615-patient set has, per
// type, exactly the store's count of resources.
func TestSystemExport615(t *testing.T) {
	e := newEnv(t, envOpts{exportCfg: export.Config{UnitSize: 20_000}})
	e.load(dataDir(t, "synthea-r4-615"))
	counts, _ := e.db.Counts(context.Background())
	m := e.mustComplete(e.kickOff("GET", "/$export", nil))
	perType := map[string]int64{}
	for _, it := range m.Output {
		perType[it.Type] += int64(len(e.lines(it.URL, true)))
	}
	if len(perType) != len(counts) {
		t.Errorf("%d types exported, store has %d", len(perType), len(counts))
	}
	for typ, n := range counts {
		if perType[typ] != n {
			t.Errorf("%s: exported %d lines, store has %d", typ, perType[typ], n)
		}
	}
}

// TestFailedExport: an export whose files cannot be written fails with a 500
// OperationOutcome and X-Progress: entered-in-error, shows no manifest, and
// leaves no files behind.
func TestFailedExport(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true})
	put(t, e, `{"resourceType":"Patient","id":"a"}`, obs("o1", "a", ""))
	loc := e.kickOff("GET", "/$export", nil)
	id := loc[strings.LastIndex(loc, "/")+1:]
	// A file where the job's folder should be: every part write fails.
	os.MkdirAll(filepath.Join(e.dir, "exports"), 0o700)
	if err := os.WriteFile(filepath.Join(e.dir, "exports", id), []byte("in the way"), 0o600); err != nil {
		t.Fatal(err)
	}
	e.startWorkers()
	r, _ := e.wait(loc)
	if r.StatusCode != 500 || r.Header.Get("X-Progress") != "entered-in-error" {
		t.Fatalf("failed export: %d %q %s", r.StatusCode, r.Header.Get("X-Progress"), r.body)
	}
	if txt := r.outcomeText(t); !strings.Contains(txt, "export failed") {
		t.Fatalf("outcome %q", txt)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "exports", id)); !os.IsNotExist(err) {
		t.Fatalf("failed job's files remain: %v", err)
	}
}

// TestRetentionSweep: finished exports are removed after the retention time.
func TestRetentionSweep(t *testing.T) {
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	e := newEnv(t, envOpts{exportCfg: export.Config{Retention: time.Hour, Now: func() time.Time { return time.Unix(0, now.Load()) }}})
	put(t, e, `{"resourceType":"Patient","id":"a"}`)
	loc := e.kickOff("GET", "/$export", nil)
	m := e.mustComplete(loc)
	if err := e.svc.Sweep(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r := e.do("GET", m.Output[0].URL, nil); r.StatusCode != 200 {
		t.Fatalf("file before expiry: %d", r.StatusCode)
	}
	now.Add(int64(2 * time.Hour))
	if err := e.svc.Sweep(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r := e.do("GET", loc, nil); r.StatusCode != 404 {
		t.Fatalf("status after expiry: %d", r.StatusCode)
	}
	if r := e.do("GET", m.Output[0].URL, nil); r.StatusCode != 404 {
		t.Fatalf("file after expiry: %d", r.StatusCode)
	}
}

// TestPartialManifests: with allowPartialManifests=true the status answers
// with manifest pages linked by "next"; the pages together list every file
// once, every page repeats the error file, and pages seen while the export ran
// are unchanged at the end. Bad values are 400s.
func TestPartialManifests(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true, exportCfg: export.Config{UnitSize: 150, Workers: 1}})
	st := e.load(dataDir(t, "synthea-r4-10"))
	for q, param := range map[string]string{"allowPartialManifests=yes": "allowPartialManifests", "organizeOutputBy=Patient": "organizeOutputBy"} {
		if r := e.do("GET", "/$export?"+q, nil, "Prefer", "respond-async"); r.StatusCode != 400 || !strings.Contains(string(r.body), `"expression":["`+param+`"]`) {
			t.Errorf("%s: %d %s", q, r.StatusCode, r.body)
		}
	}
	// A type nobody may export under lenient handling puts a line in the error file.
	loc := e.kickOff("GET", "/$export?allowPartialManifests=true&fetchResourceBatchSize=5&_type=Patient,Observation,NotAType", nil, "Prefer", "handling=lenient")
	if r := e.do("GET", loc, nil); r.StatusCode != 202 || len(bytes.TrimSpace(r.body)) != 0 {
		t.Fatalf("before any unit ran: %d %s", r.StatusCode, r.body)
	}
	e.startWorkers()
	var partial []manifest // pages seen while the export ran
	var pages []manifest
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(5 * time.Millisecond) {
		r := e.do("GET", loc, nil)
		var m manifest
		if len(bytes.TrimSpace(r.body)) > 0 {
			if err := json.Unmarshal(r.body, &m); err != nil {
				t.Fatalf("status %d body: %v %s", r.StatusCode, err, r.body)
			}
		}
		if r.StatusCode == 202 && m.TransactionTime != "" {
			if ct := r.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("partial manifest Content-Type %q", ct)
			}
			partial = append(partial, m)
		}
		if r.StatusCode == 200 {
			pages = append(pages, m)
			break
		}
		if r.StatusCode != 202 || time.Now().After(deadline) {
			t.Fatalf("status %d %s", r.StatusCode, r.body)
		}
	}
	for len(pages[len(pages)-1].Link) > 0 {
		l := pages[len(pages)-1].Link[0]
		r := e.do("GET", l.URL, nil)
		var m manifest
		if l.Relation != "next" || r.StatusCode != 200 || json.Unmarshal(r.body, &m) != nil {
			t.Fatalf("page %s (%s): %d %s", l.URL, l.Relation, r.StatusCode, r.body)
		}
		pages = append(pages, m)
	}
	t.Logf("%d partial manifests seen while running; %d pages at the end", len(partial), len(pages))
	for _, p := range partial {
		if !reflect.DeepEqual(p.Output, pages[0].Output) && !slices.ContainsFunc(pages, func(q manifest) bool { return reflect.DeepEqual(p.Output, q.Output) }) {
			t.Errorf("a page seen while running is not a page at the end: %v", p.Output)
		}
	}
	var all manifest
	for _, p := range pages {
		if len(p.Error) != 1 || p.TransactionTime != pages[0].TransactionTime || p.Request != pages[0].Request {
			t.Errorf("a page does not repeat the error file and the job's fields: %+v", p)
		}
		all.Output = append(all.Output, p.Output...)
	}
	got := e.exported(all)
	if len(got["Patient"]) != int(st.Written["Patient"]) || len(got["Observation"]) != int(st.Written["Observation"]) {
		t.Errorf("pages hold %d Patients and %d Observations, want %d and %d", len(got["Patient"]), len(got["Observation"]), st.Written["Patient"], st.Written["Observation"])
	}
	for typ, ids := range got {
		if n := len(slices.Compact(slices.Sorted(slices.Values(ids)))); n != len(ids) {
			t.Errorf("%s: %d lines for %d ids", typ, len(ids), n)
		}
	}
	for q, want := range map[string]int{"?page=abc": 400, "?page=0": 400, fmt.Sprintf("?page=%d", len(pages)+1): 404} {
		if r := e.do("GET", loc+q, nil); r.StatusCode != want {
			t.Errorf("%s: %d, want %d", q, r.StatusCode, want)
		}
	}
	plain := e.mustComplete(e.kickOff("GET", "/$export?_type=Patient", nil))
	if len(plain.Link) != 0 {
		t.Errorf("a manifest without allowPartialManifests has links: %v", plain.Link)
	}
}

// TestPatientLevelTypesOutsideCompartment (issue 19, finding 7): at the
// Patient and Group levels a _type outside the Patient compartment brings
// the resources the patients' data references only beside a compartment
// type; asked alone it is just its resources that reference the patients
// themselves, and nothing for a type that never does (Practitioner).
func TestPatientLevelTypesOutsideCompartment(t *testing.T) {
	e := newEnv(t, envOpts{})
	put(t, e, `{"resourceType":"Patient","id":"a"}`, `{"resourceType":"Patient","id":"b"}`,
		`{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/a"}}]}`,
		obs("o1", "a", `,"performer":[{"reference":"Practitioner/dr"}],"device":{"reference":"Device/d-ref"}`),
		`{"resourceType":"Encounter","id":"e1","status":"finished","class":{"code":"AMB"},"subject":{"reference":"Patient/a"},"participant":[{"individual":{"reference":"Practitioner/enc-dr"}}]}`,
		`{"resourceType":"Device","id":"d-own","patient":{"reference":"Patient/a"}}`,
		`{"resourceType":"Device","id":"d-b","patient":{"reference":"Patient/b"}}`,
		`{"resourceType":"Device","id":"d-ref"}`,
		`{"resourceType":"Practitioner","id":"dr"}`, `{"resourceType":"Practitioner","id":"enc-dr"}`, `{"resourceType":"Practitioner","id":"other"}`)
	for _, tc := range []struct {
		types string
		want  []string
	}{
		{"Practitioner", nil},
		{"Device", []string{"Device/d-own"}},
		{"Practitioner,Device", []string{"Device/d-own"}},
		// Beside a compartment type: what the patients' data references (of
		// any of its types, as indexed) and what references the patients.
		{"Observation,Practitioner", []string{"Observation/o1", "Practitioner/dr", "Practitioner/enc-dr"}},
		{"Observation,Device", []string{"Device/d-own", "Device/d-ref", "Observation/o1"}},
	} {
		for _, level := range []string{"/Patient/$export?patient=Patient/a&", "/Group/g/$export?"} {
			got := exportedRefs(t, e, e.mustComplete(e.kickOff("GET", level+"_type="+tc.types, nil)))
			if !slices.Equal(got, tc.want) {
				t.Errorf("%s_type=%s: %v, want %v", level, tc.types, got, tc.want)
			}
		}
	}
}

// TestGroupPatientNotMember (issue 19, "lenient is lenient"): a patient
// parameter naming someone who is not an active member of the Group is a
// 400 naming them; under Prefer: handling=lenient the members among them are
// exported and every other id is an error-file line.
func TestGroupPatientNotMember(t *testing.T) {
	e := newEnv(t, envOpts{})
	put(t, e, `{"resourceType":"Patient","id":"a"}`, `{"resourceType":"Patient","id":"b"}`, `{"resourceType":"Patient","id":"c"}`,
		obs("o-a", "a", ""), obs("o-b", "b", ""), obs("o-c", "c", ""),
		`{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/a"}},{"entity":{"reference":"Patient/b"},"inactive":true}]}`)
	path := "/Group/g/$export?_type=Patient,Observation&patient=Patient/a,Patient/b,Patient/c"
	if r := e.do("GET", path, nil, "Prefer", "respond-async"); r.StatusCode != 400 || !strings.Contains(r.outcomeText(t), "Patient/b, Patient/c is not an active member") {
		t.Errorf("strict: %d %s", r.StatusCode, r.body)
	}
	m := e.mustComplete(e.kickOff("GET", path, nil, "Prefer", "handling=lenient"))
	if got := exportedRefs(t, e, m); !slices.Equal(got, []string{"Observation/o-a", "Patient/a"}) {
		t.Errorf("lenient: exported %v", got)
	}
	if len(m.Error) != 1 {
		t.Fatalf("lenient: error files %+v", m.Error)
	}
	text := string(bytes.Join(e.lines(m.Error[0].URL, false), []byte("\n")))
	for _, id := range []string{"b", "c"} {
		if !strings.Contains(text, "Patient/"+id+" is not an active member of Group/g; skipped") {
			t.Errorf("lenient: error file does not name Patient/%s: %s", id, text)
		}
	}
}

// TestConcurrentKickOffsKeepLimits (issue 16, finding 5): ten kick-offs of
// one client at once against a per-client limit of 3 give exactly three
// exports and seven 429s with Retry-After.
func TestConcurrentKickOffsKeepLimits(t *testing.T) {
	e := newEnv(t, envOpts{noWorkers: true, exportCfg: export.Config{MaxActiveJobs: 5, MaxActiveJobsPerOwner: 3}})
	put(t, e, `{"resourceType":"Patient","id":"a"}`)
	codes := make([]int, 10)
	var wg sync.WaitGroup
	for i := range codes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest("GET", e.base+"/$export", nil)
			req.Header.Set("Prefer", "respond-async")
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			res.Body.Close()
			if res.StatusCode == 429 && res.Header.Get("Retry-After") == "" {
				t.Error("429 without Retry-After")
			}
			codes[i] = res.StatusCode
		}()
	}
	wg.Wait()
	n := map[int]int{}
	for _, c := range codes {
		n[c]++
	}
	if n[202] != 3 || n[429] != 7 {
		t.Fatalf("10 concurrent kick-offs with a per-client limit of 3: %v", n)
	}
}
