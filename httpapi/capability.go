package httpapi

import (
	"net/http"
	"sync"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

type capOperation struct {
	Name       string `json:"name"`
	Definition string `json:"definition"`
}

type capSearchParam struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

type capInteraction struct {
	Code string `json:"code"`
}

type capResource struct {
	Type         string           `json:"type"`
	Interaction  []capInteraction `json:"interaction"`
	Versioning   string           `json:"versioning"`
	ReadHistory  bool             `json:"readHistory"`
	UpdateCreate bool             `json:"updateCreate"`
	SearchParam  []capSearchParam `json:"searchParam"`
	Operation    []capOperation   `json:"operation,omitempty"`
}

var resourceInteractions = []capInteraction{{"read"}, {"vread"}, {"update"}, {"delete"}, {"history-instance"}, {"create"}, {"search-type"}}

var capResources = sync.OnceValue(func() []capResource {
	var out []capResource
	for _, t := range fhir.R4().Resources {
		var sps []capSearchParam
		for _, p := range fhir.SearchParams(t) {
			sps = append(sps, capSearchParam{Name: p[0], Type: p[1]})
		}
		r := capResource{Type: t, Interaction: resourceInteractions, Versioning: "versioned", ReadHistory: true, UpdateCreate: true, SearchParam: sps}
		switch t {
		case "Patient":
			r.Operation = []capOperation{{"export", "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"}}
		case "Group":
			r.Operation = []capOperation{{"export", "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}}
		}
		out = append(out, r)
	}
	return out
})

// metadata answers the CapabilityStatement: what this server really does.
func (s *Server) metadata(w http.ResponseWriter, r *http.Request) {
	cs := map[string]any{
		"resourceType": "CapabilityStatement",
		"status":       "active",
		"date":         time.Now().UTC().Format("2006-01-02"),
		"kind":         "instance",
		"instantiates": []string{"http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"},
		"software":     map[string]string{"name": "Kiln", "version": kiln.Version},
		"implementation": map[string]string{
			"description": "Kiln FHIR R4 server",
			"url":         s.publicURL(r, s.cfg.BasePath),
		},
		"fhirVersion": "4.0.1",
		"format":      []string{"application/fhir+json", "json"},
		"rest":        []map[string]any{s.capRest(r)},
	}
	writeJSON(w, http.StatusOK, fhirJSON, cs)
}

// capRest is the CapabilityStatement's rest entry; with authentication on,
// its security says so the way SMART clients look for it: the SMART-on-FHIR
// service coding and the oauth-uris extension naming the token endpoint
// (SMART App Launch 2, "Conformance"), the same facts as
// /.well-known/smart-configuration.
func (s *Server) capRest(r *http.Request) map[string]any {
	rest := map[string]any{
		"mode":        "server",
		"interaction": []capInteraction{{"transaction"}, {"batch"}},
		"resource":    capResources(),
		// SQL on FHIR's operations, at system level (R4 has no ViewDefinition
		// type to list them under); they also answer under /ViewDefinition/.
		"operation": []capOperation{{"export", "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"},
			{"viewdefinition-run", "http://sql-on-fhir.org/OperationDefinition/$viewdefinition-run"},
			{"viewdefinition-export", "http://sql-on-fhir.org/OperationDefinition/$viewdefinition-export"}},
		"documentation": "ViewDefinition (SQL on FHIR v2) is not an R4 resource type: Kiln stores views as that specification's logical model at [base]/ViewDefinition (create, read, update, delete, list; no history or search), apart from the R4 resources, and resolves viewReference values of the form ViewDefinition/[id] to them in $viewdefinition-run and $viewdefinition-export.",
	}
	if s.cfg.Verifier == nil {
		return rest
	}
	sec := map[string]any{
		"cors": false,
		"service": []map[string]any{{
			"coding": []map[string]string{{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}},
			"text":   "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)",
		}},
		"description": "Bearer tokens (RFC 6750) on every endpoint but metadata, discovery, health and the token endpoint; SMART Backend Services (client_credentials with private_key_jwt) at the token endpoint.",
	}
	if s.cfg.Token != nil {
		sec["extension"] = []map[string]any{{
			"url":       "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
			"extension": []map[string]string{{"url": "token", "valueUri": s.publicURL(r, "/auth/token")}},
		}}
	}
	rest["security"] = sec
	return rest
}
