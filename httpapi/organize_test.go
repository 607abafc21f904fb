package httpapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln/export"
	"github.com/kiln-fhir/kiln/fhir"
)

// block is one resource block of organized output, as read back.
type block struct {
	patient string
	refs    []string // type/id of its resources, in file order
	files   []string // the files it is in, in order
}

// readBlocks downloads the output files of an organized manifest, in
// manifest order, and cuts them into blocks: a Parameters header naming
// Patient/X, then resources. A block that goes on in the next file (the
// file's continuesInFile) must start that file again under the same header.
func readBlocks(t *testing.T, e *env, m manifest) []*block {
	t.Helper()
	if m.OutputOrganizedBy != "Patient" {
		t.Fatalf("outputOrganizedBy %q", m.OutputOrganizedBy)
	}
	var blocks []*block
	var carried *block // the block the previous file said goes on
	for i, it := range m.Output {
		if it.Type != "" {
			t.Errorf("organized output item with a type: %+v", it)
		}
		lines := e.lines(it.URL, false)
		if len(lines) != it.Count {
			t.Fatalf("%s: %d lines, count %d", it.URL, len(lines), it.Count)
		}
		var cur *block
		for n, l := range lines {
			var r struct {
				ResourceType, ID string
				Parameter        []struct {
					Name           string
					ValueReference struct{ Reference string }
				}
			}
			if err := json.Unmarshal(l, &r); err != nil {
				t.Fatalf("%s line %d: %v", it.URL, n+1, err)
			}
			if r.ResourceType != "Parameters" {
				if _, err := fhir.Parse(l); err != nil {
					t.Fatalf("%s line %d is not valid R4: %v", it.URL, n+1, err)
				}
			} else {
				if len(r.Parameter) != 1 || r.Parameter[0].Name != "header" || !strings.HasPrefix(r.Parameter[0].ValueReference.Reference, "Patient/") {
					t.Fatalf("%s line %d: a Parameters that is not a block header: %s", it.URL, n+1, l)
				}
				p := strings.TrimPrefix(r.Parameter[0].ValueReference.Reference, "Patient/")
				if n == 0 && carried != nil {
					if p != carried.patient {
						t.Fatalf("%s continues the block of %s but starts with the header of %s", m.Output[i-1].URL, carried.patient, p)
					}
					cur, carried = carried, nil
					cur.files = append(cur.files, it.URL)
					continue
				}
				cur = &block{patient: p, files: []string{it.URL}}
				blocks = append(blocks, cur)
				continue
			}
			if cur == nil {
				t.Fatalf("%s line %d: %s/%s before any header", it.URL, n+1, r.ResourceType, r.ID)
			}
			cur.refs = append(cur.refs, r.ResourceType+"/"+r.ID)
		}
		if carried != nil {
			t.Fatalf("%s said its last block goes on in %s, which does not start with it", m.Output[i-1].URL, it.URL)
		}
		if it.ContinuesInFile != "" {
			if i+1 >= len(m.Output) || m.Output[i+1].URL != it.ContinuesInFile {
				t.Fatalf("%s continuesInFile %s, not the next output file", it.URL, it.ContinuesInFile)
			}
			carried = cur
		}
	}
	if carried != nil {
		t.Fatal("the last file says its block goes on")
	}
	return blocks
}

// TestOrganizeOutputByPatient (issue 19, finding 4): organizeOutputBy=Patient
// writes resource blocks — a Parameters header naming the patient, the
// patient, then its compartment — with every block's members in that
// patient's compartment, each resource once, the compartment data of the
// plain export exactly, blocks whole in one file unless larger than the file
// limit (then continued, header repeated, continuesInFile set), no type on
// the output items and outputOrganizedBy in the manifest; on both levels,
// and with allowPartialManifests.
func TestOrganizeOutputByPatient(t *testing.T) {
	const maxFile = 400
	e := newEnv(t, envOpts{exportCfg: export.Config{MaxFileResources: maxFile}})
	e.load(dataDir(t, "synthea-r4-10"))
	ctx := context.Background()
	plain := e.mustComplete(e.kickOff("GET", "/Patient/$export", nil))
	var want []string
	exported := e.exported(plain)
	groupAll(t, e, exported["Patient"])
	for typ, ids := range exported {
		if !fhir.R4().InCompartment(typ) {
			continue // blocks hold the compartment only
		}
		for _, id := range ids {
			want = append(want, typ+"/"+id)
		}
	}
	want = append(want, "Group/all-patients") // made after the plain export; in every member's compartment
	slices.Sort(want)

	for _, path := range []string{"/Patient/$export?organizeOutputBy=Patient", "/Group/all-patients/$export?organizeOutputBy=Patient&patientReferenceBatchSize=3",
		"/Patient/$export?organizeOutputBy=Patient&allowPartialManifests=true"} {
		m := e.mustComplete(e.kickOff("GET", path, nil))
		for len(m.Link) > 0 { // allowPartialManifests: gather every page's files
			var next manifest
			json.Unmarshal(e.do("GET", m.Link[0].URL, nil).body, &next)
			m.Link = next.Link
			m.Output = append(m.Output, next.Output...)
		}
		blocks := readBlocks(t, e, m)
		var got []string
		split := 0
		seen := map[string]bool{}
		for _, b := range blocks {
			if seen[b.patient] {
				t.Errorf("%s: two blocks of %s", path, b.patient)
			}
			seen[b.patient] = true
			if len(b.refs) == 0 || b.refs[0] != "Patient/"+b.patient {
				t.Errorf("%s: block of %s does not start with the patient: %.3v", path, b.patient, b.refs)
			}
			comp, err := e.db.CompartmentOf(ctx, b.patient)
			if err != nil {
				t.Fatal(err)
			}
			in := map[string]bool{}
			for _, r := range comp {
				in[r.Type+"/"+r.ID] = true
			}
			for _, r := range b.refs {
				if !in[r] {
					t.Errorf("%s: %s is in the block of %s but not in its compartment", path, r, b.patient)
				}
			}
			if len(b.files) > 1 {
				split++
				if len(b.refs)+1 <= maxFile {
					t.Errorf("%s: block of %s (%d resources) split across %v though a file holds %d", path, b.patient, len(b.refs), b.files, maxFile)
				}
			}
			got = append(got, b.refs...)
		}
		slices.Sort(got)
		if c := slices.Compact(slices.Clone(got)); len(c) != len(got) {
			t.Errorf("%s: a resource is in two blocks", path)
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: blocks hold %d resources, the compartment data of a plain export is %d", path, len(got), len(want))
		}
		if split == 0 {
			t.Errorf("%s: no block was larger than %d resources: the test data does not exercise continuesInFile", path, maxFile)
		}
		t.Logf("%s: %d blocks in %d files, %d split", path, len(blocks), len(m.Output), split)
	}
}

// groupAll makes Group/all-patients with the given patients as members.
func groupAll(t *testing.T, e *env, ids []string) {
	t.Helper()
	var members []string
	for _, id := range ids {
		members = append(members, `{"entity":{"reference":"Patient/`+id+`"}}`)
	}
	put(t, e, `{"resourceType":"Group","id":"all-patients","type":"person","actual":true,"member":[`+strings.Join(members, ",")+`]}`)
}

// TestOrganizeOutputByRefusals: what organizeOutputBy=Patient cannot honour
// is a 400 naming the parameter, or under lenient handling a line in the
// error file and the export without it.
func TestOrganizeOutputByRefusals(t *testing.T) {
	e := newEnv(t, envOpts{})
	put(t, e, `{"resourceType":"Patient","id":"a"}`, obs("o1", "a", `,"performer":[{"reference":"Practitioner/dr"}]`), `{"resourceType":"Practitioner","id":"dr"}`)
	for _, tc := range []struct{ query, expr string }{
		{"/$export?organizeOutputBy=Patient", "organizeOutputBy"},
		{"/Patient/$export?organizeOutputBy=Group", "organizeOutputBy"},
		{"/Patient/$export?organizeOutputBy=Patient&_type=Observation,Practitioner", "_type"},
		{"/Patient/$export?organizeOutputBy=Patient&includeAssociatedData=LatestProvenanceResources", "includeAssociatedData"},
	} {
		if r := e.do("GET", tc.query, nil, "Prefer", "respond-async"); r.StatusCode != 400 || !strings.Contains(string(r.body), `"expression":["`+tc.expr+`"]`) {
			t.Errorf("%s: %d %s", tc.query, r.StatusCode, r.body)
		}
	}
	m := e.mustComplete(e.kickOff("GET", "/Patient/$export?organizeOutputBy=Patient&_type=Patient,Observation,Practitioner", nil, "Prefer", "handling=lenient"))
	blocks := readBlocks(t, e, m)
	if len(blocks) != 1 || !slices.Equal(blocks[0].refs, []string{"Patient/a", "Observation/o1"}) {
		t.Errorf("lenient organized export: %+v", blocks)
	}
	if len(m.Error) != 1 || !bytes.Contains(bytes.Join(e.lines(m.Error[0].URL, false), nil), []byte("Practitioner is outside the Patient compartment")) {
		t.Errorf("lenient organized export: error file %+v", m.Error)
	}
}
