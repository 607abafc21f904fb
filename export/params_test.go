package export

import (
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/kiln-fhir/kiln"
)

func kick(level, query string, body string, ctype string) KickOff {
	q, _ := url.ParseQuery(query)
	return KickOff{Level: level, URL: "http://x/4_0_0/$export?" + query, Query: q, Body: []byte(body), ContentType: ctype}
}

func TestParseKickOffValues(t *testing.T) {
	req, err := ParseKickOff(kick(kiln.LevelPatient,
		"_type=Patient,Observation&_type=Condition&patient=patient/1,2&patient=Patient/3&_outputFormat=ndjson&_since=2023-10-10&_until=2024-01-31&loglevel=DEBUG&requestsMemory=2Gi&limitsMemory=8G&ram=1&ttlSecondsAfterFinished=30&patientReferenceBatchSize=20&fetchResourceBatchSize=30&uploadPartSize=5242880",
		`{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Encounter"},{"name":"includeAssociatedData","valueCode":"LatestProvenanceResources"}]}`, "application/fhir+json"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(req.Types, []string{"Patient", "Observation", "Condition", "Encounter"}) {
		t.Errorf("types %v", req.Types)
	}
	if !slices.Equal(req.Patients, []string{"1", "2", "3"}) {
		t.Errorf("patients %v", req.Patients)
	}
	if req.OutputFormat != "application/fhir+ndjson" || req.LogLevel != "debug" || *req.TTLSecondsAfterFinished != 30 {
		t.Errorf("format %q loglevel %q ttl %d", req.OutputFormat, req.LogLevel, *req.TTLSecondsAfterFinished)
	}
	if req.PatientReferenceBatchSize != 20 || req.FetchResourceBatchSize != 30 || req.UploadPartSize != 5<<20 {
		t.Errorf("batch sizes %d %d %d", req.PatientReferenceBatchSize, req.FetchResourceBatchSize, req.UploadPartSize)
	}
	if got := req.Since.Format("2006-01-02T15:04:05Z07:00"); got != "2023-10-10T00:00:00Z" {
		t.Errorf("since %s", got)
	}
	if got := req.Until.Format("2006-01-02T15:04:05.000Z07:00"); got != "2024-01-31T00:00:00.000Z" {
		t.Errorf("until %s (a date is its first millisecond)", got)
	}
	if !slices.Equal(req.IncludeAssociatedData, []string{"LatestProvenanceResources"}) {
		t.Errorf("includeAssociatedData %v", req.IncludeAssociatedData)
	}
}

func TestParseKickOffDefaultsAndLenient(t *testing.T) {
	req, err := ParseKickOff(kick(kiln.LevelSystem, "", "", ""))
	if err != nil {
		t.Fatal(err)
	}
	if req.PatientReferenceBatchSize != DefaultPatientBatch || req.FetchResourceBatchSize != DefaultFetchBatch || req.UploadPartSize != DefaultPartSize {
		t.Errorf("defaults %+v", req)
	}
	k := kick(kiln.LevelSystem, "_outputFormat=text/csv&organizeOutputBy=Patient&_type=Nope,Patient", "", "")
	k.Prefer = "respond-async, handling=lenient"
	req, err = ParseKickOff(k)
	if err != nil {
		t.Fatal(err)
	}
	if len(req.Warnings) != 3 || !slices.Equal(req.Types, []string{"Patient"}) {
		t.Errorf("lenient: warnings %v types %v", req.Warnings, req.Types)
	}
	// Lenient does not excuse values that are wrong rather than unsupported.
	k = kick(kiln.LevelSystem, "fetchResourceBatchSize=0", "", "")
	k.Prefer = "handling=lenient"
	if _, err := ParseKickOff(k); kiln.ErrorCode(err) != kiln.EINVALID {
		t.Errorf("lenient bad batch size: %v", err)
	}
}

func TestParseMemory(t *testing.T) {
	for in, want := range map[string]int64{"2G": 2e9, "2Gi": 2 << 30, "512M": 512e6, "1": 1e9, "1.5": 1.5e9, "256Mi": 256 << 20} {
		if got, err := ParseMemory(in); err != nil || got != want {
			t.Errorf("%s: %d %v, want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "2GB", "-1G", "lots", "0.0001", "3e9"} {
		if _, err := ParseMemory(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestSubsetter(t *testing.T) {
	s := newSubsetter("Observation", []string{"value", "Patient.gender", "status"})
	out, err := s.apply([]byte(`{"resourceType":"Observation","id":"o","meta":{"versionId":"1"},"status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p"},"valueQuantity":{"value":1.0}}`))
	if err != nil {
		t.Fatal(err)
	}
	got := string(out)
	for _, want := range []string{`"status":"final"`, `"code":`, `"valueQuantity":{"value":1.0}`, `"SUBSETTED"`, `"versionId":"1"`} {
		if !strings.Contains(got, want) {
			t.Errorf("%s lacks %s", got, want)
		}
	}
	if strings.Contains(got, "subject") {
		t.Errorf("%s keeps subject", got)
	}
}

func TestAssembleSplitsAndOrders(t *testing.T) {
	parts := []kiln.Part{
		{Type: "Patient", Name: "a", Count: 2, Bytes: 10, Kind: "output"},
		{Type: "Observation", Name: "b", Count: 3, Bytes: 10, Kind: "output"},
		{Type: "Patient", Name: "c", Count: 2, Bytes: 10, Kind: "output"},
		{Type: "Patient", Name: "d", Count: 1, Bytes: 10, Kind: "output"},
		{Type: "Patient", Name: "e", Count: 0, Bytes: 0, Kind: "output"},
		{Type: "OperationOutcome", Name: "f", Count: 1, Bytes: 10, Kind: "error"},
	}
	files := assemble(parts, 4, 1000, "ndjson")
	var names []string
	for _, f := range files {
		names = append(names, f.Name+":"+strings.Join(f.Parts, "+"))
	}
	want := []string{"Observation-1.ndjson:b", "Patient-1.ndjson:a+c", "Patient-2.ndjson:d", "error-1.ndjson:f"}
	if !slices.Equal(names, want) {
		t.Fatalf("files %v, want %v", names, want)
	}
}

// TestTypeFilterBounds: more than MaxTypeFilters queries, or one longer
// than MaxTypeFilterLength, is a 400 naming _typeFilter, lenient or not;
// at the bounds they are accepted.
func TestTypeFilterBounds(t *testing.T) {
	many := func(n int) string {
		q := url.Values{}
		for i := range n {
			q.Add("_typeFilter", "Observation?code="+strings.Repeat("1", 1+i%5))
		}
		return q.Encode()
	}
	long := func(n int) string {
		return url.Values{"_typeFilter": {"Observation?code=" + strings.Repeat("x", n-len("Observation?code="))}}.Encode()
	}
	for _, c := range []struct {
		name, query string
		ok          bool
	}{
		{"at the count", many(MaxTypeFilters), true},
		{"over the count", many(MaxTypeFilters + 1), false},
		{"at the length", long(MaxTypeFilterLength), true},
		{"over the length", long(MaxTypeFilterLength + 1), false},
	} {
		for _, prefer := range []string{"respond-async", "respond-async, handling=lenient"} {
			k := kick(kiln.LevelSystem, c.query, "", "")
			k.Prefer = prefer
			_, err := ParseKickOff(k)
			if c.ok && err != nil {
				t.Errorf("%s (%s): %v", c.name, prefer, err)
			}
			if !c.ok && (kiln.ErrorCode(err) != kiln.EINVALID || !strings.Contains(err.Error(), "_typeFilter")) {
				t.Errorf("%s (%s): %v, want a 400 on _typeFilter", c.name, prefer, err)
			}
		}
	}
}
