package export

import (
	"bufio"
	"compress/gzip"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/ingest"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/sqlite"
)

// TestSubsetterKeepsMandatory: whatever _elements asks for, a resource keeps
// id, meta and the elements R4 makes mandatory (min ≥ 1 in its
// StructureDefinition), with their _name twins and every typed form of a
// mandatory choice, and loses the rest; what comes out still validates.
func TestSubsetterKeepsMandatory(t *testing.T) {
	meta := `"meta":{"versionId":"1","tag":[{"system":"urn:t","code":"x"}]}`
	cases := []struct {
		name     string
		typ      string
		elements []string
		body     string
		want     []string // the keys besides resourceType, id and meta
	}{
		{"Observation, nothing of it requested", "Observation", []string{"Patient.name"},
			`{"resourceType":"Observation","id":"o",` + meta + `,"status":"final","_status":{"extension":[{"url":"urn:e","valueString":"s"}]},"code":{"text":"c"},"subject":{"reference":"Patient/p"},"effectiveDateTime":"2020-01-01","valueQuantity":{"value":1}}`,
			[]string{"_status", "code", "status"}},
		{"Observation with a requested choice", "Observation", []string{"Observation.value", "issued"},
			`{"resourceType":"Observation","id":"o",` + meta + `,"status":"final","code":{"text":"c"},"subject":{"reference":"Patient/p"},"issued":"2020-01-01T00:00:00Z","valueQuantity":{"value":1}}`,
			[]string{"code", "issued", "status", "valueQuantity"}},
		{"Patient: nothing mandatory", "Patient", []string{"Observation.code"},
			`{"resourceType":"Patient","id":"p",` + meta + `,"active":true,"name":[{"family":"F"}],"gender":"female","birthDate":"1990-01-01","_birthDate":{"extension":[{"url":"urn:e","valueString":"s"}]}}`,
			nil},
		{"Patient: requested element and its twin", "Patient", []string{"birthDate"},
			`{"resourceType":"Patient","id":"p",` + meta + `,"gender":"female","birthDate":"1990-01-01","_birthDate":{"extension":[{"url":"urn:e","valueString":"s"}]}}`,
			[]string{"_birthDate", "birthDate"}},
		{"Encounter", "Encounter", []string{"Patient.name"},
			`{"resourceType":"Encounter","id":"e",` + meta + `,"status":"finished","class":{"code":"AMB"},"type":[{"text":"t"}],"subject":{"reference":"Patient/p"},"period":{"start":"2020-01-01"}}`,
			[]string{"class", "status"}},
		{"MedicationRequest, CodeableConcept", "MedicationRequest", []string{"Patient.name"},
			`{"resourceType":"MedicationRequest","id":"m",` + meta + `,"status":"active","intent":"order","medicationCodeableConcept":{"text":"m"},"subject":{"reference":"Patient/p"},"authoredOn":"2020-01-01","requester":{"reference":"Practitioner/d"}}`,
			[]string{"intent", "medicationCodeableConcept", "status", "subject"}},
		{"MedicationRequest, Reference", "MedicationRequest", []string{"Patient.name"},
			`{"resourceType":"MedicationRequest","id":"m",` + meta + `,"status":"active","intent":"order","medicationReference":{"reference":"Medication/x"},"subject":{"reference":"Patient/p"},"authoredOn":"2020-01-01"}`,
			[]string{"intent", "medicationReference", "status", "subject"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := fhir.Parse([]byte(c.body)); err != nil {
				t.Fatalf("fixture: %v", err)
			}
			out, err := newSubsetter(c.typ, c.elements).apply([]byte(c.body))
			if err != nil {
				t.Fatal(err)
			}
			p, err := fhir.Parse(out)
			if err != nil {
				t.Fatalf("subsetted resource does not validate: %v: %s", err, out)
			}
			want := append([]string{"id", "meta", "resourceType"}, c.want...)
			sort.Strings(want)
			if got := slices.Sorted(maps.Keys(p.Map)); !slices.Equal(got, want) {
				t.Fatalf("keys %v, want %v: %s", got, want, out)
			}
			m := p.Map["meta"].(map[string]any)
			if m["versionId"] != "1" {
				t.Fatalf("meta lost versionId: %s", out)
			}
			if tags := tagCodes(m); !slices.Equal(tags, []string{"urn:t|x", subsettedSystem + "|SUBSETTED"}) {
				t.Fatalf("tags %v: %s", tags, out)
			}
		})
	}

	t.Run("already subsetted", func(t *testing.T) {
		body := `{"resourceType":"Patient","id":"p","meta":{"tag":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED"}]},"gender":"male"}`
		out, err := newSubsetter("Patient", []string{"gender"}).apply([]byte(body))
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		json.Unmarshal(out, &m)
		if tags := tagCodes(m["meta"].(map[string]any)); !slices.Equal(tags, []string{subsettedSystem + "|SUBSETTED"}) {
			t.Fatalf("tags %v: %s", tags, out)
		}
	})
}

// tagCodes lists meta's tags as system|code.
func tagCodes(meta map[string]any) []string {
	var out []string
	for _, tag := range meta["tag"].([]any) {
		c := tag.(map[string]any)
		out = append(out, c["system"].(string)+"|"+c["code"].(string))
	}
	return out
}

// mandatorySynthea is, per type of the Synthea set, what R4 makes mandatory
// (min ≥ 1 at the top level of the resource's StructureDefinition), written
// out from the specification's pages rather than read from Kiln's table.
var mandatorySynthea = map[string][]string{
	"AllergyIntolerance":   {"patient"},
	"CarePlan":             {"status", "intent", "subject"},
	"CareTeam":             nil,
	"Claim":                {"status", "type", "use", "patient", "created", "provider", "priority", "insurance"},
	"Condition":            {"subject"},
	"Device":               nil,
	"DiagnosticReport":     {"status", "code"},
	"Encounter":            {"status", "class"},
	"ExplanationOfBenefit": {"status", "type", "use", "patient", "created", "insurer", "provider", "outcome", "insurance"},
	"Group":                {"type", "actual"},
	"ImagingStudy":         {"status", "subject"},
	"Immunization":         {"status", "vaccineCode", "patient", "occurrence[x]"},
	"MedicationRequest":    {"status", "intent", "medication[x]", "subject"},
	"Observation":          {"status", "code"},
	"Organization":         nil,
	"Patient":              nil,
	"Practitioner":         nil,
	"Procedure":            {"status", "subject"},
}

// TestElementsExportSynthea exports the 10-patient Synthea set with
// _elements=Observation.code,Patient.name: every resource written is valid R4,
// is tagged SUBSETTED once, and has exactly its mandatory elements, id, meta
// and the requested ones (those it had), with their stored values.
func TestElementsExportSynthea(t *testing.T) {
	ctx := context.Background()
	src := filepath.Join("..", "..", "shared", "data", "synthea-r4-10")
	dir := t.TempDir()
	db, err := sqlite.Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if st, err := ingest.Load(ctx, db, []string{src}, ingest.LoadOptions{NewID: uuid.NewString}); err != nil || st.RejectedCount > 0 {
		t.Fatalf("load: %v %+v", err, st)
	}
	stored := readSynthea(t, src)
	sink, err := localfs.New(filepath.Join(dir, "exports"))
	if err != nil {
		t.Fatal(err)
	}
	s := New(db, db, sink, Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	req := NewRequest(kiln.LevelSystem)
	req.Elements, req.PatientReferenceBatchSize, req.FetchResourceBatchSize = []string{"Observation.code", "Patient.name"}, 100, 500
	j, err := s.Start(ctx, req, "t")
	if err != nil {
		t.Fatal(err)
	}
	// The units run here, one after another, so the job is done when none is left.
	for {
		cur, err := s.Job(ctx, j.ID)
		if err != nil {
			t.Fatal(err)
		}
		if cur.Finished() {
			j = cur
			break
		}
		u, err := db.ClaimUnit(ctx, time.Minute)
		if err != nil || u == nil {
			t.Fatalf("claim: %v %v", u, err)
		}
		s.runUnit(ctx, u, 0)
	}
	if j.State != kiln.JobCompleted {
		t.Fatalf("job %s: %s", j.State, j.Error)
	}

	requested := map[string][]string{"Observation": {"code"}, "Patient": {"name"}}
	counts := map[string]int{}
	for _, f := range j.Files {
		if f.Kind != "output" {
			continue
		}
		rc, _, err := s.OpenFile(ctx, j, f.Name)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(rc)
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			p, err := fhir.Parse(sc.Bytes())
			if err != nil {
				t.Fatalf("%s: exported resource does not validate: %v: %s", f.Name, err, sc.Bytes())
			}
			counts[p.Type]++
			mandatory, ok := mandatorySynthea[p.Type]
			if !ok {
				t.Fatalf("unexpected type %s", p.Type)
			}
			orig := stored[p.Type+"/"+p.ID]
			if orig == nil {
				t.Fatalf("%s/%s is not in the source", p.Type, p.ID)
			}
			keys := map[string]bool{"id": true, "meta": true, "resourceType": true}
			for _, e := range slices.Concat(mandatory, requested[p.Type]) {
				base, choice := strings.CutSuffix(e, "[x]")
				n := 0
				for k := range orig {
					if k == base || k == "_"+base || choice && strings.HasPrefix(k, base) && len(k) > len(base) && k[len(base)] >= 'A' && k[len(base)] <= 'Z' {
						keys[k] = true
						n++
					}
				}
				// Synthea fills in every mandatory element, so each must be there.
				if n == 0 && slices.Contains(mandatory, e) {
					t.Fatalf("%s/%s: the source lacks mandatory %s", p.Type, p.ID, e)
				}
			}
			want := slices.Sorted(maps.Keys(keys))
			if got := slices.Sorted(maps.Keys(p.Map)); !slices.Equal(got, want) {
				t.Fatalf("%s/%s keys %v, want %v", p.Type, p.ID, got, want)
			}
			for _, k := range want {
				if k != "meta" && jsonValue(t, p.Map[k]) != jsonValue(t, orig[k]) {
					t.Fatalf("%s/%s.%s changed: %v, stored %v", p.Type, p.ID, k, p.Map[k], orig[k])
				}
			}
			n := 0
			for _, tag := range p.Map["meta"].(map[string]any)["tag"].([]any) {
				if c := tag.(map[string]any); c["system"] == subsettedSystem && c["code"] == subsettedCode {
					n++
				}
			}
			if n != 1 {
				t.Fatalf("%s/%s carries the SUBSETTED tag %d times", p.Type, p.ID, n)
			}
		}
		if err := sc.Err(); err != nil {
			t.Fatal(err)
		}
		rc.Close()
	}
	want := map[string]int{}
	for k := range stored {
		typ, _, _ := strings.Cut(k, "/")
		want[typ]++
	}
	if !maps.Equal(counts, want) {
		t.Fatalf("exported %v, stored %v", counts, want)
	}
}

// readSynthea returns the source resources by Type/id.
func readSynthea(t *testing.T, src string) map[string]map[string]any {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(src, "*.ndjson.gz"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no Synthea files in %s: %v", src, err)
	}
	out := map[string]map[string]any{}
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		gz, err := gzip.NewReader(f)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(gz)
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			m, err := fhir.DecodeJSON(sc.Bytes())
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			out[m["resourceType"].(string)+"/"+m["id"].(string)] = m
		}
		if err := sc.Err(); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	return out
}

// jsonValue normalises v through JSON, so that numbers compare by their text.
func jsonValue(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
