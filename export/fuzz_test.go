package export

import (
	"net/url"
	"testing"

	"github.com/kiln-fhir/kiln"
)

// FuzzParseKickOff: any query, body and content type gives a request or a
// 4xx error, never a panic or an internal error.
func FuzzParseKickOff(f *testing.F) {
	f.Add("_type=Patient&_since=2023-10-10", "", "")
	f.Add("patient=patient/1,2&patientReferenceBatchSize=20&requestsMemory=2Gi&limitsMemory=1G", "", "")
	f.Add("", `{"resourceType":"Parameters","parameter":[{"name":"patient","valueReference":{"reference":"Patient/1"}}]}`, "application/fhir+json")
	f.Add("", "_type=Observation&_elements=status", "application/x-www-form-urlencoded")
	f.Add("_outputFormat=ndjson&_until=2024", `{"resourceType":"Parameters","parameter":{}}`, "application/json")
	f.Fuzz(func(t *testing.T, query, body, ctype string) {
		q, err := url.ParseQuery(query)
		if err != nil {
			return
		}
		for _, level := range []string{kiln.LevelSystem, kiln.LevelPatient, kiln.LevelGroup} {
			req, err := ParseKickOff(KickOff{Level: level, Query: q, Body: []byte(body), ContentType: ctype, Prefer: "handling=lenient"})
			if err != nil {
				if c := kiln.ErrorCode(err); c != kiln.EINVALID && c != kiln.EUNSUPPORTED {
					t.Fatalf("error code %s for a client mistake: %v", c, err)
				}
				continue
			}
			if req.PatientReferenceBatchSize < 1 || req.FetchResourceBatchSize < 1 || req.UploadPartSize < MinPartSize {
				t.Fatalf("out-of-range value accepted: %+v", req)
			}
		}
	})
}
