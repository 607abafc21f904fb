package kiln

import (
	"encoding/json"
	"testing"
)

func TestDecide(t *testing.T) {
	h1, h2 := []byte{1}, []byte{2}
	live := Prior{Exists: true, Version: 3, Hash: h1}
	tomb := Prior{Exists: true, Deleted: true, Version: 4}
	for _, c := range []struct {
		name    string
		w       Write
		p       Prior
		step    WriteStep
		version int64
		code    string // error code, if any
		flags   string // c(reated) u(nchanged) d(eleted)
	}{
		{"put new", Write{Kind: Put, Hash: h1}, Prior{}, StepInsert, 1, "", "c"},
		{"create new", Write{Kind: Create, Hash: h1}, Prior{}, StepInsert, 1, "", "c"},
		{"put same content", Write{Kind: Put, Hash: h1}, live, StepNone, 3, "", "u"},
		{"put new content", Write{Kind: Put, Hash: h2}, live, StepUpdate, 4, "", ""},
		{"create over live", Write{Kind: Create, Hash: h2}, live, StepNone, 0, ECONFLICT, ""},
		{"create over tombstone", Write{Kind: Create, Hash: h1}, tomb, StepUpdate, 5, "", ""},
		{"put same hash over tombstone", Write{Kind: Put, Hash: nil}, tomb, StepUpdate, 5, "", ""},
		{"delete live", Write{Kind: Delete}, live, StepDelete, 4, "", "d"},
		{"delete tombstone", Write{Kind: Delete}, tomb, StepNone, 4, "", "ud"},
		{"delete nothing", Write{Kind: Delete}, Prior{}, StepNone, 0, "", "ud"},
		{"if-match right", Write{Kind: Put, Hash: h2, IfMatch: 3}, live, StepUpdate, 4, "", ""},
		{"if-match wrong", Write{Kind: Put, Hash: h2, IfMatch: 2}, live, StepNone, 0, EPRECONDITION, ""},
		{"if-match on tombstone", Write{Kind: Delete, IfMatch: 4}, tomb, StepNone, 0, EPRECONDITION, ""},
		{"if-match on nothing", Write{Kind: Put, Hash: h1, IfMatch: 1}, Prior{}, StepNone, 0, EPRECONDITION, ""},
	} {
		c.w.Type, c.w.ID = "Patient", "p"
		step, res, err := Decide(&c.w, c.p)
		if c.code != "" {
			if ErrorCode(err) != c.code || step != StepNone {
				t.Errorf("%s: step %d, err %v; want %s", c.name, step, err, c.code)
			}
			continue
		}
		flags := ""
		for _, f := range []struct {
			on bool
			s  string
		}{{res.Created, "c"}, {res.Unchanged, "u"}, {res.Deleted, "d"}} {
			if f.on {
				flags += f.s
			}
		}
		if err != nil || step != c.step || res.Version != c.version || flags != c.flags || res.Type != "Patient" || res.ID != "p" {
			t.Errorf("%s: step %d version %d flags %q err %v; want step %d version %d flags %q", c.name, step, res.Version, flags, err, c.step, c.version, c.flags)
		}
	}
}

// TestExportRequestUnsetConvention: nil is unset and empty is a limit that
// admits nothing, through the JSON a job is stored as — and requests stored
// with the older flags come back with their limits, never as "no limit".
func TestExportRequestUnsetConvention(t *testing.T) {
	var r ExportRequest
	r.Types, r.Tenants = []string{}, []string{} // asked for types, none left; no tenant visible
	b, err := json.Marshal(&r)
	if err != nil {
		t.Fatal(err)
	}
	var back ExportRequest
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Types == nil || !back.TypesAsked() || back.Tenants == nil || back.ReadTypes != nil || !back.Reads("Claim") {
		t.Errorf("round trip of %s: types %#v tenants %#v readTypes %#v", b, back.Types, back.Tenants, back.ReadTypes)
	}
	legacy := `{"level":"system","typesGiven":true,"limitTypes":true,"limitTenants":true,"outputFormat":"application/fhir+ndjson","patientReferenceBatchSize":250}`
	var old ExportRequest
	if err := json.Unmarshal([]byte(legacy), &old); err != nil {
		t.Fatal(err)
	}
	if old.Types == nil || old.ReadTypes == nil || old.Tenants == nil || old.Reads("Patient") || old.PatientReferenceBatchSize != 250 || old.Level != LevelSystem {
		t.Errorf("legacy request read as %+v", old)
	}
	var none ExportRequest
	if err := json.Unmarshal([]byte(`{"level":"patient","readTypes":["Patient"]}`), &none); err != nil {
		t.Fatal(err)
	}
	if none.Types != nil || none.Tenants != nil || !none.Reads("Patient") || none.Reads("Observation") {
		t.Errorf("request without limits read as %+v", none)
	}
}
