package export

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
	"github.com/kiln-fhir/kiln/view"
)

// viewName is the form of an output name: it names files, and SQL tables
// after them.
var viewName = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,63}$`)

// reservedName reports whether a view name would collide with the job's
// own files (error-1.ndjson, deleted-1.ndjson, blocks-1.ndjson).
func reservedName(s string) bool {
	switch strings.ToLower(s) {
	case "error", "deleted", "blocks":
		return true
	}
	return false
}

// maxViews caps the views of one $viewdefinition-export.
const maxViews = 50

// ParseViewKickOff validates a $viewdefinition-export kick-off (SQL on FHIR
// v2): a Parameters body with one or more view parameters (each a name and
// an inline viewResource), clientTrackingId, _format, header, patient (any
// number), group (one) and _since. Every mistake is an EINVALID *kiln.Error
// naming the parameter; what Kiln does not support (viewReference, source,
// several groups) is refused, never ignored. The request is a system,
// Patient or Group export whose types are the views' types.
func ParseViewKickOff(k KickOff) (*kiln.ExportRequest, error) {
	if !preferAsync(k.Prefer) {
		return nil, kiln.Invalid("Prefer", "$viewdefinition-export is asynchronous: send Prefer: respond-async")
	}
	for name := range k.Query {
		return nil, kiln.Invalid(name, "%s: $viewdefinition-export takes its parameters in a Parameters body, not the query", name)
	}
	if len(bytes.TrimSpace(k.Body)) == 0 {
		return nil, kiln.Invalid("body", "$viewdefinition-export needs a Parameters body with at least one view")
	}
	m, err := fhir.DecodeJSON(k.Body)
	if err != nil {
		return nil, kiln.Invalid("body", "body is not a JSON object: %v", err)
	}
	if rt, _ := m["resourceType"].(string); rt != "Parameters" {
		return nil, kiln.Invalid("resourceType", "$viewdefinition-export takes a Parameters resource, got %q", rt)
	}
	req := NewRequest(kiln.LevelSystem)
	req.RequestURL = k.URL
	req.Types = []string{}
	req.ViewFormat, req.ViewHeader = "ndjson", true
	list, _ := m["parameter"].([]any)
	var groups []string
	for i, raw := range list {
		at := fmt.Sprintf("Parameters.parameter[%d]", i)
		pm, _ := raw.(map[string]any)
		name, _ := pm["name"].(string)
		switch name {
		case "view":
			if len(req.Views) == maxViews {
				return nil, kiln.Invalid(at, "at most %d views in one export", maxViews)
			}
			v, err := viewParam(pm, at, len(req.Views), k.ResolveView)
			if err != nil {
				return nil, err
			}
			if slices.ContainsFunc(req.Views, func(o kiln.ViewExport) bool { return strings.EqualFold(o.Name, v.Name) }) {
				return nil, kiln.Invalid(at, "two views are named %q; give each its own name", v.Name)
			}
			req.Views = append(req.Views, v)
			if !slices.Contains(req.Types, v.Resource) {
				req.Types = append(req.Types, v.Resource)
			}
		case "clientTrackingId":
			s, ok := pm["valueString"].(string)
			if !ok || len(s) > 256 {
				return nil, kiln.Invalid(at, "clientTrackingId must be a valueString of at most 256 characters")
			}
			req.ClientTrackingID = s
		case "_format":
			s := stringValue(pm)
			f, ok := view.Formats[strings.ToLower(s)]
			if !ok {
				return nil, kiln.Invalid(at, "_format %q is not one of csv, ndjson, json, parquet", s)
			}
			req.ViewFormat = f
		case "header":
			b, ok := pm["valueBoolean"].(bool)
			if !ok {
				return nil, kiln.Invalid(at, "header must be a valueBoolean")
			}
			req.ViewHeader = b
		case "patient":
			id, err := refParam(pm, at, "Patient")
			if err != nil {
				return nil, err
			}
			if !slices.Contains(req.Patients, id) {
				req.Patients = append(req.Patients, id)
			}
		case "group":
			id, err := refParam(pm, at, "Group")
			if err != nil {
				return nil, err
			}
			groups = append(groups, id)
		case "_since":
			s := stringValue(pm)
			start, _, _, err := fhir.ParseDateTime(s)
			if err != nil {
				return nil, kiln.Invalid(at, "_since: %v", err)
			}
			at := start.Truncate(time.Millisecond)
			req.Since = &at
		case "source":
			return nil, kiln.Invalid(at, "source is not supported: Kiln exports its own data only")
		default:
			return nil, kiln.Invalid(at+".name", "%q is not a parameter of $viewdefinition-export", name)
		}
	}
	if len(req.Views) == 0 {
		return nil, kiln.Invalid("Parameters.parameter", "$viewdefinition-export needs at least one view parameter")
	}
	switch {
	case len(groups) > 0 && len(req.Patients) > 0:
		return nil, kiln.Invalid("group", "send patient or group, not both")
	case len(groups) > 1:
		return nil, kiln.Invalid("group", "only one group per export is supported")
	case len(groups) == 1:
		req.Level, req.GroupID = kiln.LevelGroup, groups[0]
	case len(req.Patients) > 0:
		req.Level = kiln.LevelPatient
	}
	return req, nil
}

// viewParam reads one view parameter: its name and inline viewResource.
func viewParam(pm map[string]any, at string, n int, resolve func(ref, at string) (map[string]any, error)) (kiln.ViewExport, error) {
	var out kiln.ViewExport
	var def map[string]any
	parts, _ := pm["part"].([]any)
	if len(parts) == 0 {
		return out, kiln.Invalid(at, "a view parameter needs parts: viewResource or viewReference, and optionally name")
	}
	seen := map[string]bool{}
	for j, raw := range parts {
		pat := fmt.Sprintf("%s.part[%d]", at, j)
		part, _ := raw.(map[string]any)
		name, _ := part["name"].(string)
		if seen[name] {
			return out, kiln.Invalid(pat, "a view parameter takes one %s part", name)
		}
		seen[name] = true
		switch name {
		case "name":
			s, ok := part["valueString"].(string)
			if !ok || !viewName.MatchString(s) {
				return out, kiln.Invalid(pat, "a view's name must be a valueString of letters, digits and _, starting with a letter (at most 64)")
			}
			if reservedName(s) {
				return out, kiln.Invalid(pat, "%q names the export's own files; choose another view name", s)
			}
			out.Name = s
		case "viewResource":
			res, ok := part["resource"].(map[string]any)
			if !ok {
				return out, kiln.Invalid(pat+".resource", "viewResource must carry the ViewDefinition in resource")
			}
			if def != nil {
				return out, kiln.Invalid(pat, "send one view per view parameter: viewResource or viewReference")
			}
			def = res
		case "viewReference":
			ref, _ := part["valueReference"].(map[string]any)
			s, _ := ref["reference"].(string)
			if def != nil {
				return out, kiln.Invalid(pat, "send one view per view parameter: viewResource or viewReference")
			}
			if resolve == nil {
				return out, kiln.Invalid(pat, "viewReference is not supported here")
			}
			res, err := resolve(s, pat)
			if err != nil {
				return out, err
			}
			def = res
		default:
			return out, kiln.Invalid(pat+".name", "%q is not a part of a view parameter", name)
		}
	}
	if def == nil {
		return out, kiln.Invalid(at, "a view parameter needs a viewResource or viewReference part")
	}
	v, err := view.Compile(def)
	if err != nil {
		return out, err
	}
	if !fhir.R4().IsResourceType(v.Resource) {
		return out, kiln.Invalid("ViewDefinition.resource", "%q is not an R4 resource type", v.Resource)
	}
	if out.Name == "" {
		out.Name = v.Name
		if !viewName.MatchString(out.Name) || reservedName(out.Name) {
			out.Name = fmt.Sprintf("view_%d", n+1)
		}
	}
	out.Resource = v.Resource
	if out.Definition, err = json.Marshal(def); err != nil {
		return out, fmt.Errorf("keep view: %w", err)
	}
	return out, nil
}

// refParam reads a valueReference (or a valueString) naming a resource of
// typ, as typ/id or id.
func refParam(pm map[string]any, at, typ string) (string, error) {
	s := stringValue(pm)
	if ref, ok := pm["valueReference"].(map[string]any); ok {
		s, _ = ref["reference"].(string)
	}
	id := strings.TrimPrefix(s, typ+"/")
	if !fhir.ValidID(id) {
		return "", kiln.Invalid(at, "%s must reference a %s as %s/id, got %q", strings.ToLower(typ), typ, typ, s)
	}
	return id, nil
}

// stringValue is a parameter's primitive value[x] as text.
func stringValue(pm map[string]any) string {
	for k, v := range pm {
		if strings.HasPrefix(k, "value") {
			if s, ok := v.(string); ok {
				return s
			}
		}
	}
	return ""
}

// preferAsync reports whether the Prefer header asks for respond-async.
func preferAsync(prefer string) bool {
	for _, p := range strings.Split(prefer, ",") {
		if strings.EqualFold(strings.TrimSpace(p), "respond-async") {
			return true
		}
	}
	return false
}
