package httpapi_test

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/httpapi"
)

// tenantObs is an Observation tagged for the given tenants; marker is text
// that appears in its body only, so a test can tell whose version leaked.
func tenantObs(id, marker string, tenants ...string) []byte {
	var sec []string
	for _, t := range tenants {
		sec = append(sec, fmt.Sprintf(`{"system":%q,"code":%q}`, kiln.AccessSystem, t))
	}
	meta := ""
	if len(sec) > 0 {
		meta = fmt.Sprintf(`,"meta":{"security":[%s]}`, strings.Join(sec, ","))
	}
	return []byte(fmt.Sprintf(`{"resourceType":"Observation","id":%q,"status":"final","code":{"text":%q}%s}`, id, marker, meta))
}

// TestDeletedRecordKeepsItsTenant: tenant B's deleted record cannot be
// taken over by tenant A (a PUT over B's tombstone is 404, like a read),
// A never sees B's versions in its history, and A cannot learn that the
// record exists (404, not 410).
func TestDeletedRecordKeepsItsTenant(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	a := bearer(r.token(t, "alice", "system/*.* access/tenantA.*"))
	b := bearer(r.token(t, "bob", "system/*.* access/tenantB.*"))
	none := bearer(r.token(t, "eve", "system/*.*"))
	if res := r.do("PUT", "/Observation/x", tenantObs("x", "secret-of-B", "tenantB"), b...); res.StatusCode != 201 {
		t.Fatalf("B creates: %d %s", res.StatusCode, res.body)
	}
	if res := r.do("DELETE", "/Observation/x", nil, b...); res.StatusCode != 204 {
		t.Fatalf("B deletes: %d %s", res.StatusCode, res.body)
	}
	// putWant: A may write tenantA records, so the PUT reaches B's tombstone
	// and is 404; a token with no access scope may not tag at all (403,
	// which says nothing about the record).
	putWant := map[string]int{"A": 404, "no access scope": 403}
	for name, tok := range map[string][]string{"A": a, "no access scope": none} {
		if res := r.do("GET", "/Observation/x", nil, tok...); res.StatusCode != 404 {
			t.Errorf("%s reads B's deleted record: %d, want 404", name, res.StatusCode)
		}
		if res := r.do("PUT", "/Observation/x", tenantObs("x", "A-takes-over", "tenantA"), tok...); res.StatusCode != putWant[name] {
			t.Errorf("%s PUTs over B's deleted record: %d %s, want %d", name, res.StatusCode, res.body, putWant[name])
		}
		if res := r.do("DELETE", "/Observation/x", nil, tok...); res.StatusCode != 404 {
			t.Errorf("%s deletes B's deleted record: %d, want 404", name, res.StatusCode)
		}
		res := r.do("GET", "/Observation/x/_history", nil, tok...)
		if res.StatusCode != 404 || strings.Contains(string(res.body), "secret-of-B") {
			t.Errorf("%s reads B's history: %d %s, want 404 without B's data", name, res.StatusCode, res.body)
		}
	}
	// B itself still sees its record as deleted, with its history intact.
	if res := r.do("GET", "/Observation/x", nil, b...); res.StatusCode != 410 {
		t.Errorf("B reads its deleted record: %d, want 410", res.StatusCode)
	}
	h := r.do("GET", "/Observation/x/_history", nil, b...)
	if h.StatusCode != 200 || !strings.Contains(string(h.body), "secret-of-B") || strings.Contains(string(h.body), "A-takes-over") {
		t.Errorf("B's history: %d %s", h.StatusCode, h.body)
	}
	// B may bring it back.
	if res := r.do("PUT", "/Observation/x", tenantObs("x", "B-again", "tenantB"), b...); res.StatusCode/100 != 2 {
		t.Errorf("B recreates its record: %d %s", res.StatusCode, res.body)
	}
}

// TestHistoryJudgesEachVersion: a record moved from tenant B to tenant A
// shows A only the versions tagged for A, and B only B's.
func TestHistoryJudgesEachVersion(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	both := bearer(r.token(t, "admin", "system/*.* access/tenantA.* access/tenantB.*"))
	a := bearer(r.token(t, "alice", "system/*.read access/tenantA.read"))
	b := bearer(r.token(t, "bob", "system/*.read access/tenantB.read"))
	if res := r.do("PUT", "/Observation/y", tenantObs("y", "v1-of-B", "tenantB"), both...); res.StatusCode != 201 {
		t.Fatalf("create: %d %s", res.StatusCode, res.body)
	}
	if res := r.do("PUT", "/Observation/y", tenantObs("y", "v2-of-A", "tenantA"), both...); res.StatusCode != 200 {
		t.Fatalf("re-tag: %d %s", res.StatusCode, res.body)
	}
	for _, c := range []struct {
		name      string
		tok       []string
		has, hasn string
	}{{"A", a, "v2-of-A", "v1-of-B"}, {"B", b, "v1-of-B", "v2-of-A"}} {
		h := r.do("GET", "/Observation/y/_history", nil, c.tok...)
		if h.StatusCode != 200 {
			t.Fatalf("%s history: %d %s", c.name, h.StatusCode, h.body)
		}
		body := string(h.body)
		if !strings.Contains(body, c.has) || strings.Contains(body, c.hasn) {
			t.Errorf("%s history holds the wrong versions: %s", c.name, body)
		}
		if m := h.json(t); m["total"].(float64) != 1 {
			t.Errorf("%s history total %v, want 1", c.name, m["total"])
		}
	}
}

// TestReadOnlyTenantAccessCannotChangeData: a token that may write every
// type but only read tenant A's records may neither delete them nor
// rewrite them without a tag; a tenant-limited writer must tag what it
// writes, and cannot strip a record of a tenant it may not write.
func TestReadOnlyTenantAccessCannotChangeData(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	admin := bearer(r.token(t, "admin", "system/*.* access/*.*"))
	ro := bearer(r.token(t, "mallory", "system/*.* access/tenantA.read"))
	aw := bearer(r.token(t, "alice", "system/*.* access/tenantA.*"))
	if res := r.do("PUT", "/Observation/z", tenantObs("z", "kept", "tenantA"), admin...); res.StatusCode != 201 {
		t.Fatalf("create: %d %s", res.StatusCode, res.body)
	}
	if res := r.do("PUT", "/Observation/shared", tenantObs("shared", "both", "tenantA", "tenantB"), admin...); res.StatusCode != 201 {
		t.Fatalf("create shared: %d %s", res.StatusCode, res.body)
	}
	if res := r.do("DELETE", "/Observation/z", nil, ro...); res.StatusCode != 403 {
		t.Errorf("read-only token deletes: %d, want 403", res.StatusCode)
	}
	if res := r.do("PUT", "/Observation/z", tenantObs("z", "untagged"), ro...); res.StatusCode/100 == 2 {
		t.Errorf("read-only token rewrites without a tag: %d", res.StatusCode)
	}
	if res := r.do("PUT", "/Observation/new", tenantObs("new", "untagged"), aw...); res.StatusCode != 400 {
		t.Errorf("tenant writer creates an untagged record: %d, want 400", res.StatusCode)
	}
	if res := r.do("PUT", "/Observation/shared", tenantObs("shared", "stripped", "tenantA"), aw...); res.StatusCode != 403 {
		t.Errorf("tenant A strips tenant B's code: %d, want 403", res.StatusCode)
	}
	if res := r.do("DELETE", "/Observation/shared", nil, aw...); res.StatusCode != 403 {
		t.Errorf("tenant A deletes a record tenant B shares: %d, want 403", res.StatusCode)
	}
	for _, id := range []string{"z", "shared"} {
		res := r.do("GET", "/Observation/"+id, nil, admin...)
		if res.StatusCode != 200 || strings.Contains(string(res.body), "untagged") || strings.Contains(string(res.body), "stripped") {
			t.Errorf("%s after refused writes: %d %s", id, res.StatusCode, res.body)
		}
	}
	// Its own record, tenant A's writer may change and delete.
	if res := r.do("PUT", "/Observation/z", tenantObs("z", "edited", "tenantA"), aw...); res.StatusCode != 200 {
		t.Errorf("A edits its record: %d %s", res.StatusCode, res.body)
	}
	if res := r.do("DELETE", "/Observation/z", nil, aw...); res.StatusCode != 204 {
		t.Errorf("A deletes its record: %d %s", res.StatusCode, res.body)
	}
}

// TestExportJudgesTheSnapshotVersion: an export holds each record as of its
// transactionTime, and judges that version's tags, not the current ones. A
// record of tenant B re-tagged to tenant A while A's and B's exports wait
// stays out of A's export and in B's, at system and Patient level.
func TestExportJudgesTheSnapshotVersion(t *testing.T) {
	r := newAuthEnv(t, envOpts{noWorkers: true})
	admin := bearer(r.token(t, "admin", "system/*.* access/*.*"))
	a := r.token(t, "alice", "system/*.read access/tenantA.read")
	b := r.token(t, "bob", "system/*.read access/tenantB.read")
	patient := `{"resourceType":"Patient","id":"p","meta":{"security":[` +
		fmt.Sprintf(`{"system":%q,"code":"tenantA"},{"system":%q,"code":"tenantB"}`, kiln.AccessSystem, kiln.AccessSystem) + `]}}`
	obsFor := func(marker, tenant string) []byte {
		return []byte(fmt.Sprintf(`{"resourceType":"Observation","id":"x","status":"final","code":{"text":%q},"subject":{"reference":"Patient/p"},"meta":{"security":[{"system":%q,"code":%q}]}}`,
			marker, kiln.AccessSystem, tenant))
	}
	if res := r.do("PUT", "/Patient/p", []byte(patient), admin...); res.StatusCode != 201 {
		t.Fatalf("patient: %d %s", res.StatusCode, res.body)
	}
	if res := r.do("PUT", "/Observation/x", obsFor("secret-of-B", "tenantB"), admin...); res.StatusCode != 201 {
		t.Fatalf("observation: %d %s", res.StatusCode, res.body)
	}
	type kick struct {
		tok, path, loc string
		wantB          bool
	}
	var kicks []kick
	for _, path := range []string{"/$export?_type=Observation", "/Patient/$export?_type=Observation"} {
		kicks = append(kicks, kick{a, path, r.kickOff("GET", path, nil, bearer(a)...), false},
			kick{b, path, r.kickOff("GET", path, nil, bearer(b)...), true})
	}
	// After the snapshot, the record moves to tenant A.
	if res := r.do("PUT", "/Observation/x", obsFor("now-of-A", "tenantA"), admin...); res.StatusCode != 200 {
		t.Fatalf("re-tag: %d %s", res.StatusCode, res.body)
	}
	r.startWorkers()
	for _, k := range kicks {
		m := r.mustCompleteAuth(k.loc, k.tok)
		var all strings.Builder
		for _, it := range m.Output {
			for _, l := range r.linesAuth(it.URL, k.tok) {
				all.Write(l)
			}
		}
		got := all.String()
		if strings.Contains(got, "now-of-A") {
			t.Errorf("%s: an export holds a version newer than its snapshot: %s", k.path, got)
		}
		if k.wantB != strings.Contains(got, "secret-of-B") {
			t.Errorf("%s for tenant B=%v: export %q, want B's version only in B's", k.path, k.wantB, got)
		}
	}
}

// TestPatientScopesWriteOnlyTheirPatient: patient/Observation.write with a
// patient context writes and deletes that patient's Observations only: one
// about another patient is refused (403) and another patient's existing one
// is not there for it (404, as for a read); without a context it writes nothing.
func TestPatientScopesWriteOnlyTheirPatient(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	admin := bearer(r.token(t, "admin", "system/*.* access/tenantA.*"))
	obs := func(id, patient string) []byte {
		return []byte(fmt.Sprintf(`{"resourceType":"Observation","id":%q,"status":"final","code":{"text":"x"},"subject":{"reference":"Patient/%s"},"meta":{"security":[{"system":%q,"code":"tenantA"}]}}`, id, patient, kiln.AccessSystem))
	}
	for id, p := range map[string]string{"mine": "p1", "theirs": "p2", "absolute": r.base + "/Patient/p1"} {
		body := obs(id, p)
		if strings.HasPrefix(p, "http") { // an absolute reference to this server counts as its own
			body = []byte(strings.Replace(string(body), "Patient/"+p, p, 1))
		}
		if res := r.do("PUT", "/Observation/"+id, body, admin...); res.StatusCode != 201 {
			t.Fatalf("seed %s: %d %s", id, res.StatusCode, res.body)
		}
	}
	tok, err := r.verifier.Mint("pat", "patient/Observation.cruds access/tenantA.*", time.Minute, map[string]any{"patient": "p1"})
	if err != nil {
		t.Fatal(err)
	}
	p1 := bearer(tok)
	for _, c := range []struct {
		method, path string
		body         []byte
		want         int
	}{
		{"PUT", "/Observation/mine", obs("mine", "p1"), 200},
		{"PUT", "/Observation/new", obs("new", "p1"), 201},
		{"PUT", "/Observation/moved", obs("moved", "p2"), 403},   // about another patient
		{"PUT", "/Observation/mine", obs("mine", "p2"), 403},     // moving its own to another patient
		{"PUT", "/Observation/theirs", obs("theirs", "p1"), 404}, // taking another patient's
		{"PUT", "/Observation/both", []byte(fmt.Sprintf(`{"resourceType":"Observation","id":"both","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p2"},"performer":[{"reference":"Patient/p1"}],"meta":{"security":[{"system":%q,"code":"tenantA"}]}}`, kiln.AccessSystem)), 403}, // into another patient's chart, as performer
		{"DELETE", "/Observation/theirs", nil, 404},
		{"GET", "/Observation/theirs", nil, 404},
		{"GET", "/Observation/absolute", nil, 200}, // its subject is the server's own absolute URL of p1
		{"DELETE", "/Observation/absolute", nil, 204},
		{"DELETE", "/Observation/mine", nil, 204},
	} {
		if res := r.do(c.method, c.path, c.body, p1...); res.StatusCode != c.want {
			t.Errorf("patient p1 %s %s: %d %s, want %d", c.method, c.path, res.StatusCode, res.body, c.want)
		}
	}
	if res := r.do("GET", "/Observation/theirs", nil, admin...); res.StatusCode != 200 || !strings.Contains(string(res.body), "Patient/p2") {
		t.Errorf("another patient's Observation after the attempts: %d %s", res.StatusCode, res.body)
	}
	noCtx := bearer(r.token(t, "pat", "patient/Observation.cruds access/tenantA.*"))
	if res := r.do("PUT", "/Observation/new", obs("new", "p1"), noCtx...); res.StatusCode != 403 {
		t.Errorf("patient/ scopes without a context write: %d, want 403", res.StatusCode)
	}
}

// TestExportBelongsToIssuerSubjectAndItsScopes (issue 17, finding 7): an
// export is reached — status, file, cancel — only by a token of the same
// issuer and subject that still holds the reads it was started with; any
// other gets the 404 of an unknown export, and the export is untouched.
func TestExportBelongsToIssuerSubjectAndItsScopes(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	dir, _ := tagged(t)
	r.load(dir)
	alice := r.token(t, "alice", "system/*.read access/tenantA.read")
	res := r.do("GET", "/$export?_type=Patient", nil, append(bearer(alice), "Prefer", "respond-async")...)
	if res.StatusCode != 202 {
		t.Fatalf("kick-off: %d %s", res.StatusCode, res.body)
	}
	loc := res.Header.Get("Content-Location")
	m := r.mustCompleteAuth(loc, alice)
	if len(m.Output) == 0 {
		t.Fatal("no files")
	}
	file := m.Output[0].URL
	now := time.Now()
	otherIssuer := r.idpToken(t, jwt.SigningMethodRS256, r.rsaKey, jwt.MapClaims{"iss": "https://idp.example", "sub": "alice", "aud": r.base,
		"scope": "system/*.read access/tenantA.read", "exp": now.Add(time.Minute).Unix()}, map[string]any{"kid": "idp-1"})
	for name, tok := range map[string]string{
		"another issuer's alice":        otherIssuer,
		"alice with no scope":           r.token(t, "alice", ""),
		"alice with no access scope":    r.token(t, "alice", "system/*.read"),
		"alice with fewer types":        r.token(t, "alice", "system/Observation.read access/tenantA.read"),
		"alice with another tenant":     r.token(t, "alice", "system/*.read access/tenantB.read"),
		"alice with only lab Patients?": r.token(t, "alice", "system/Patient.rs?gender=female access/tenantA.read"),
	} {
		for _, req := range []struct{ method, url string }{{"GET", loc}, {"GET", file}, {"DELETE", loc}} {
			res := r.do(req.method, req.url, nil, bearer(tok)...)
			if res.StatusCode != 404 || strings.Contains(string(res.body), `"resourceType":"Patient"`) {
				t.Errorf("%s: %s %s: %d %.200s, want 404", name, req.method, req.url, res.StatusCode, res.body)
			}
		}
	}
	// The owner, also with more scopes than it started with, still reaches it.
	wider := r.token(t, "alice", "system/*.read access/tenantA.read access/tenantB.read")
	for _, tok := range []string{alice, wider} {
		if res := r.do("GET", file, nil, bearer(tok)...); res.StatusCode != 200 {
			t.Errorf("the owner's file: %d", res.StatusCode)
		}
	}
	if res := r.do("DELETE", loc, nil, bearer(alice)...); res.StatusCode != 202 {
		t.Errorf("the owner cancels: %d %s", res.StatusCode, res.body)
	}
}

// TestDownloadSlotsPerClient (issue 17, finding 8): one client holding its
// download slots open gets 429 for more, while another client still
// downloads.
func TestDownloadSlotsPerClient(t *testing.T) {
	r := newAuthEnv(t, envOpts{httpCfg: httpapi.Config{MaxDownloads: 4, MaxDownloadsPerClient: 2}})
	admin := bearer(r.token(t, "admin", "system/*.* access/tenantA.*"))
	// 20 MB of Observations: more than socket buffers hold, so an unread download stays open.
	for b := range 4 {
		var entries []string
		for i := range 5000 {
			o := fmt.Sprintf(`{"resourceType":"Observation","id":"o%d-%d","status":"final","code":{"text":"x"},"note":[{"text":%q}],"meta":{"security":[{"system":%q,"code":"tenantA"}]}}`,
				b, i, strings.Repeat("n", 1000), kiln.AccessSystem)
			entries = append(entries, fmt.Sprintf(`{"resource":%s,"request":{"method":"PUT","url":"Observation/o%d-%d"}}`, o, b, i))
		}
		bundle := `{"resourceType":"Bundle","type":"batch","entry":[` + strings.Join(entries, ",") + `]}`
		if res := r.do("POST", "/", []byte(bundle), admin...); res.StatusCode != 200 {
			t.Fatalf("load: %d %.300s", res.StatusCode, res.body)
		}
	}
	file := func(tok string) string {
		res := r.do("GET", "/$export?_type=Observation", nil, append(bearer(tok), "Prefer", "respond-async")...)
		if res.StatusCode != 202 {
			t.Fatalf("kick-off: %d %s", res.StatusCode, res.body)
		}
		return r.mustCompleteAuth(res.Header.Get("Content-Location"), tok).Output[0].URL
	}
	alice, bob := r.token(t, "alice", "system/*.read access/tenantA.read"), r.token(t, "bob", "system/*.read access/tenantA.read")
	aliceFile, bobFile := file(alice), file(bob)
	plain := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	hold := func(url, tok string) *http.Response {
		req, _ := http.NewRequest("GET", url, nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		res, err := plain.Do(req) // the slot is taken before the headers go out
		if err != nil || res.StatusCode != 200 {
			t.Fatalf("download: %v %v", res, err)
		}
		return res
	}
	for range 2 {
		defer hold(aliceFile, alice).Body.Close()
	}
	if res := r.do("GET", aliceFile, nil, bearer(alice)...); res.StatusCode != 429 || !strings.Contains(string(res.body), "this client") {
		t.Errorf("alice's third concurrent download: %d %.200s, want 429", res.StatusCode, res.body)
	}
	if res := r.do("GET", bobFile, nil, bearer(bob)...); res.StatusCode != 200 {
		t.Errorf("bob's download while alice holds hers: %d, want 200", res.StatusCode)
	}
}

// TestMetricsNeedEveryTenant (issue 17): /metrics holds every tenant's
// totals, so only a token that reads every tenant gets it.
func TestMetricsNeedEveryTenant(t *testing.T) {
	r := newAuthEnv(t, envOpts{httpCfg: httpapi.Config{MetricsHandler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "kiln_export_jobs 7\n")
	})}})
	root := strings.TrimSuffix(r.base, "/4_0_0")
	for scope, want := range map[string]int{"system/*.read access/tenantA.read": 403, "system/*.read": 403, "access/*.read": 200} {
		res := r.do("GET", root+"/metrics", nil, bearer(r.token(t, "m", scope))...)
		if res.StatusCode != want || (want != 200) == strings.Contains(string(res.body), "kiln_export_jobs") {
			t.Errorf("/metrics with %q: %d %.100s, want %d", scope, res.StatusCode, res.body, want)
		}
	}
	if res := r.do("GET", root+"/metrics", nil); res.StatusCode != 401 {
		t.Errorf("/metrics without a token: %d, want 401", res.StatusCode)
	}
}

// TestExportPopulationsAreTenantFiltered (issue 17, finding 6): a tenant-A
// Group listing a tenant-B patient gets, under lenient handling, the same
// "does not exist" line for it as for an id nobody uses (no existence
// oracle), and a Patient-level export of tenant A does not bring in a
// tenant-A Practitioner that only tenant B's records reference.
func TestExportPopulationsAreTenantFiltered(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	admin := bearer(r.token(t, "admin", "system/*.* access/tenantA.* access/tenantB.*"))
	sec := func(tenant string) string {
		return fmt.Sprintf(`"meta":{"security":[{"system":%q,"code":%q}]}`, kiln.AccessSystem, tenant)
	}
	for path, body := range map[string]string{
		"/Patient/pa":         `{"resourceType":"Patient","id":"pa",` + sec("tenantA") + `}`,
		"/Patient/pb":         `{"resourceType":"Patient","id":"pb",` + sec("tenantB") + `}`,
		"/Practitioner/onlyB": `{"resourceType":"Practitioner","id":"onlyB",` + sec("tenantA") + `}`,
		"/Observation/ob":     `{"resourceType":"Observation","id":"ob","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/pb"},"performer":[{"reference":"Practitioner/onlyB"}],` + sec("tenantB") + `}`,
		"/Group/g":            `{"resourceType":"Group","id":"g","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/pa"}},{"entity":{"reference":"Patient/pb"}},{"entity":{"reference":"Patient/nobody"}}],` + sec("tenantA") + `}`,
	} {
		if res := r.do("PUT", path, []byte(body), admin...); res.StatusCode != 201 {
			t.Fatalf("PUT %s: %d %s", path, res.StatusCode, res.body)
		}
	}
	a := r.token(t, "alice", "system/*.read access/tenantA.read")
	run := func(path string) manifest {
		res := r.do("GET", path, nil, append(bearer(a), "Prefer", "respond-async, handling=lenient")...)
		if res.StatusCode != 202 {
			t.Fatalf("%s: %d %s", path, res.StatusCode, res.body)
		}
		return r.mustCompleteAuth(res.Header.Get("Content-Location"), a)
	}
	m := run("/Group/g/$export")
	var lines []string
	for _, e := range m.Error {
		for _, l := range r.linesAuth(e.URL, a) {
			lines = append(lines, string(l))
		}
	}
	text := strings.Join(lines, "\n")
	for _, id := range []string{"pb", "nobody"} {
		if !strings.Contains(text, "member Patient/"+id+" does not exist; skipped") {
			t.Errorf("Group error file for %s: %s", id, text)
		}
	}
	for typ, ids := range r.idsAuth(m, a) {
		for _, id := range ids {
			if id == "pb" || id == "ob" {
				t.Errorf("Group export holds tenant B's %s/%s", typ, id)
			}
		}
	}
	for typ, ids := range r.idsAuth(run("/Patient/$export"), a) {
		for _, id := range ids {
			if typ == "Practitioner" && id == "onlyB" {
				t.Error("the Patient-level export brought in a Practitioner only tenant B's records reference")
			}
		}
	}
}

// TestBundleEntriesAskThePolicy: every entry of a transaction or batch
// Bundle is authorised like the same single request — tenant A cannot
// overwrite or delete tenant B's record through a Bundle.
func TestBundleEntriesAskThePolicy(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	b := bearer(r.token(t, "bob", "system/*.* access/tenantB.*"))
	a := bearer(r.token(t, "alice", "system/*.* access/tenantA.*"))
	if res := r.do("PUT", "/Observation/b1", tenantObs("b1", "secret-of-B", "tenantB"), b...); res.StatusCode != 201 {
		t.Fatalf("B creates: %d %s", res.StatusCode, res.body)
	}
	takeover := fmt.Sprintf(`{"resourceType":"Bundle","type":"%%s","entry":[{"resource":%s,"request":{"method":"PUT","url":"Observation/b1"}},{"request":{"method":"DELETE","url":"Observation/b1"}}]}`,
		tenantObs("b1", "A-takes-over", "tenantA"))
	for _, kind := range []string{"transaction", "batch"} {
		res := r.do("POST", "/", []byte(fmt.Sprintf(takeover, kind)), append(a, "Content-Type", "application/fhir+json")...)
		if kind == "transaction" && res.StatusCode != 404 {
			t.Errorf("transaction over B's record: %d %.200s, want 404", res.StatusCode, res.body)
		}
		if kind == "batch" && (res.StatusCode != 200 || strings.Count(string(res.body), `"status":"404"`) != 2) {
			t.Errorf("batch over B's record: %d %.400s, want two 404 entries", res.StatusCode, res.body)
		}
	}
	if res := r.do("GET", "/Observation/b1", nil, b...); res.StatusCode != 200 || !strings.Contains(string(res.body), "secret-of-B") {
		t.Errorf("B's record after A's Bundles: %d %.200s", res.StatusCode, res.body)
	}
}

// TestWritesNeedAWriteScope: a token whose scopes do not write the type —
// read-only, or write scopes for other types — gets 403 for PUT, POST,
// DELETE and Bundle entries, and nothing changes.
func TestWritesNeedAWriteScope(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	admin := bearer(r.token(t, "admin", "system/*.* access/tenantA.*"))
	if res := r.do("PUT", "/Observation/w1", tenantObs("w1", "original", "tenantA"), admin...); res.StatusCode != 201 {
		t.Fatalf("seed: %d %s", res.StatusCode, res.body)
	}
	for name, scope := range map[string]string{
		"read only":            "system/*.read access/tenantA.*",
		"another type's write": "system/Patient.write system/Observation.read access/tenantA.*",
	} {
		tok := bearer(r.token(t, "w", scope))
		for _, c := range []struct {
			method, path string
			body         []byte
		}{
			{"PUT", "/Observation/w1", tenantObs("w1", "changed", "tenantA")},
			{"POST", "/Observation", []byte(fmt.Sprintf(`{"resourceType":"Observation","status":"final","code":{"text":"created"},"meta":{"security":[{"system":%q,"code":"tenantA"}]}}`, kiln.AccessSystem))},
			{"DELETE", "/Observation/w1", nil},
		} {
			if res := r.do(c.method, c.path, c.body, tok...); res.StatusCode != 403 {
				t.Errorf("%s: %s %s: %d, want 403", name, c.method, c.path, res.StatusCode)
			}
		}
		tx := fmt.Sprintf(`{"resourceType":"Bundle","type":"transaction","entry":[{"resource":%s,"request":{"method":"PUT","url":"Observation/w1"}}]}`, tenantObs("w1", "changed", "tenantA"))
		if res := r.do("POST", "/", []byte(tx), append(tok, "Content-Type", "application/fhir+json")...); res.StatusCode != 403 {
			t.Errorf("%s: transaction: %d, want 403", name, res.StatusCode)
		}
	}
	if res := r.do("GET", "/Observation/w1", nil, admin...); res.StatusCode != 200 || !strings.Contains(string(res.body), "original") {
		t.Errorf("the record after the refused writes: %d %.200s", res.StatusCode, res.body)
	}
}

// TestReadAndSearchScopesApart (issue 17): SMART v2 .r reads by id but does
// not search; .s searches but does not read by id.
func TestReadAndSearchScopesApart(t *testing.T) {
	r := newAuthEnv(t, envOpts{})
	admin := bearer(r.token(t, "admin", "system/*.* access/tenantA.*"))
	if res := r.do("PUT", "/Observation/rs1", tenantObs("rs1", "x", "tenantA"), admin...); res.StatusCode != 201 {
		t.Fatalf("seed: %d %s", res.StatusCode, res.body)
	}
	readOnly := bearer(r.token(t, "r", "system/Observation.r access/tenantA.read"))
	searchOnly := bearer(r.token(t, "s", "system/Observation.s access/tenantA.read"))
	for _, c := range []struct {
		name, path string
		tok        []string
		want       int
	}{
		{".r reads", "/Observation/rs1", readOnly, 200},
		{".r vreads", "/Observation/rs1/_history/1", readOnly, 200},
		{".r does not search", "/Observation?_id=rs1", readOnly, 403},
		{".s searches", "/Observation?_id=rs1", searchOnly, 200},
		{".s does not read", "/Observation/rs1", searchOnly, 403},
		{".s does not read history", "/Observation/rs1/_history", searchOnly, 403},
	} {
		res := r.do("GET", c.path, nil, c.tok...)
		if res.StatusCode != c.want {
			t.Errorf("%s: %d, want %d", c.name, res.StatusCode, c.want)
		}
		if c.want == 200 && !strings.Contains(string(res.body), `"rs1"`) {
			t.Errorf("%s: the answer lacks the record: %.200s", c.name, res.body)
		}
	}
}
