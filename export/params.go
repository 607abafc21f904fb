package export

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"mime"
	"net/url"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/fhir"
)

// Limits and defaults of the Helix job parameters.
const (
	DefaultPatientBatch = 250
	MaxPatientBatch     = 10_000
	DefaultFetchBatch   = 1000
	MaxFetchBatch       = 100_000
	MinPartSize         = 5 << 20
	MaxPartSize         = 5 << 30
	DefaultPartSize     = 100 << 20
)

// KickOff is a kick-off request as it reached the server.
type KickOff struct {
	Level   string
	GroupID string
	// URL is the absolute request URL (query included).
	URL         string
	Query       url.Values
	ContentType string
	Body        []byte
	Prefer      string
	Accept      string
	// ResolveView reads a $viewdefinition-export viewReference for the
	// caller (nil: references are refused); at names the parameter.
	ResolveView func(ref, at string) (map[string]any, error)
}

// Lenient reports whether the client sent Prefer: handling=lenient.
func (k KickOff) Lenient() bool {
	for _, p := range strings.Split(k.Prefer, ",") {
		if strings.EqualFold(strings.ReplaceAll(strings.TrimSpace(p), " ", ""), "handling=lenient") {
			return true
		}
	}
	return false
}

// paramNames maps each accepted parameter to its canonical name. The seed's
// own example spells _type as "type"; it is accepted as the same parameter.
var paramNames = map[string]string{
	"_outputFormat": "_outputFormat", "_since": "_since", "_until": "_until", "_type": "_type", "type": "_type",
	"_elements": "_elements", "patient": "patient", "includeAssociatedData": "includeAssociatedData",
	"_typeFilter": "_typeFilter", "organizeOutputBy": "organizeOutputBy", "allowPartialManifests": "allowPartialManifests",
	"patientReferenceBatchSize": "patientReferenceBatchSize", "fetchResourceBatchSize": "fetchResourceBatchSize",
	"uploadPartSize": "uploadPartSize", "loglevel": "loglevel", "requestsMemory": "requestsMemory",
	"limitsMemory": "limitsMemory", "ram": "ram", "ttlSecondsAfterFinished": "ttlSecondsAfterFinished",
}

// NewRequest is an export request of level with every default set, as a
// kick-off without parameters makes it: the one place defaults are chosen.
func NewRequest(level string) *kiln.ExportRequest {
	return &kiln.ExportRequest{
		ExportAsk: kiln.ExportAsk{Level: level, OutputFormat: kiln.FormatNDJSON},
		JobHints: kiln.JobHints{
			PatientReferenceBatchSize: DefaultPatientBatch,
			FetchResourceBatchSize:    DefaultFetchBatch,
			UploadPartSize:            DefaultPartSize,
		},
	}
}

// ParseKickOff validates a kick-off and returns the export request. Every
// mistake is an EINVALID *kiln.Error naming the parameter; under
// Prefer: handling=lenient, unsupported parameters and values become
// warnings instead (they end up in the error file).
func ParseKickOff(k KickOff) (*kiln.ExportRequest, error) {
	if k.Accept != "" && !acceptable(k.Accept) {
		return nil, &kiln.Error{Code: kiln.EINVALID, Message: fmt.Sprintf("Accept %q is not supported: kick-off answers application/fhir+json", k.Accept), Expression: []string{"Accept"}}
	}
	params, err := collect(k)
	if err != nil {
		return nil, err
	}
	req := NewRequest(k.Level)
	req.GroupID, req.RequestURL, req.Lenient = k.GroupID, k.URL, k.Lenient()
	p := parser{req: req}
	names := make([]string, 0, len(params))
	for n := range params {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, raw := range names {
		name, ok := paramNames[raw]
		vals := params[raw]
		if !ok {
			p.unsupported(raw, "unknown parameter %q", raw)
			continue
		}
		p.param(name, raw, vals)
	}
	if req.TypesAsked() {
		// A filter on a type the export leaves out cannot be honoured: under
		// lenient handling it is dropped with a warning.
		for _, typ := range slices.Sorted(maps.Keys(req.TypeFilters)) {
			if !slices.Contains(req.Types, typ) {
				p.unsupported("_typeFilter", "_typeFilter on %s, which is not in _type", typ)
				delete(req.TypeFilters, typ)
			}
		}
	}
	p.organized()
	if p.err != nil {
		return nil, p.err
	}
	if req.RequestsMemory != "" && req.LimitsMemory != "" {
		r, _ := ParseMemory(req.RequestsMemory)
		l, _ := ParseMemory(req.LimitsMemory)
		if l < r {
			return nil, kiln.Invalid("limitsMemory", "limitsMemory %s is below requestsMemory %s", req.LimitsMemory, req.RequestsMemory)
		}
	} else if req.RAM != "" && req.LimitsMemory != "" && req.RequestsMemory == "" {
		r, _ := ParseMemory(req.RAM)
		l, _ := ParseMemory(req.LimitsMemory)
		if l < r {
			return nil, kiln.Invalid("limitsMemory", "limitsMemory %s is below ram %s", req.LimitsMemory, req.RAM)
		}
	}
	if req.Since != nil && req.Until != nil && !req.Until.After(*req.Since) {
		return nil, kiln.Invalid("_until", "_until must be after _since")
	}
	return req, nil
}

func acceptable(accept string) bool {
	for _, part := range strings.Split(accept, ",") {
		mt, _, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err != nil {
			continue
		}
		switch mt {
		case "application/fhir+json", "application/json", "application/json+fhir", "*/*", "application/*":
			return true
		}
	}
	return false
}

// collect merges query parameters with a form or Parameters body. Values of
// one name from both places are all kept.
func collect(k KickOff) (map[string][]string, error) {
	out := map[string][]string{}
	for n, vs := range k.Query {
		out[n] = append(out[n], vs...)
	}
	if len(bytes.TrimSpace(k.Body)) == 0 {
		return out, nil
	}
	mt := ""
	if k.ContentType != "" {
		var err error
		if mt, _, err = mime.ParseMediaType(k.ContentType); err != nil {
			return nil, kiln.Invalid("Content-Type", "Content-Type %q cannot be read: %v", k.ContentType, err)
		}
	}
	switch mt {
	case "application/x-www-form-urlencoded":
		form, err := url.ParseQuery(string(k.Body))
		if err != nil {
			return nil, kiln.Invalid("body", "form body cannot be read: %v", err)
		}
		for n, vs := range form {
			out[n] = append(out[n], vs...)
		}
	case "", "application/fhir+json", "application/json", "application/json+fhir":
		ps, err := ParametersBody(k.Body)
		if err != nil {
			return nil, err
		}
		for _, p := range ps {
			out[p[0]] = append(out[p[0]], p[1])
		}
	default:
		return nil, &kiln.Error{Code: kiln.EUNSUPPORTED, Message: fmt.Sprintf("Content-Type %q is not supported for kick-off: send a FHIR Parameters resource (application/fhir+json) or a form (application/x-www-form-urlencoded)", k.ContentType), Expression: []string{"Content-Type"}}
	}
	return out, nil
}

// ParametersBody reads a FHIR Parameters resource into name/value pairs.
// Each parameter must carry exactly one value[x] of a primitive type or a Reference.
func ParametersBody(body []byte) ([][2]string, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, kiln.Invalid("body", "body is not a JSON object: %v", err)
	}
	if rt, _ := m["resourceType"].(string); rt != "Parameters" {
		return nil, kiln.Invalid("resourceType", "kick-off body must be a Parameters resource, got resourceType %q", rt)
	}
	raw, ok := m["parameter"]
	if !ok {
		return nil, nil
	}
	list, ok := raw.([]any)
	if !ok {
		return nil, kiln.Invalid("Parameters.parameter", "Parameters.parameter must be an array")
	}
	var out [][2]string
	for i, item := range list {
		path := fmt.Sprintf("Parameters.parameter[%d]", i)
		pm, ok := item.(map[string]any)
		if !ok {
			return nil, kiln.Invalid(path, "%s must be an object", path)
		}
		name, _ := pm["name"].(string)
		if name == "" {
			return nil, kiln.Invalid(path+".name", "%s.name is required", path)
		}
		var vals []string
		for key, v := range pm {
			if !strings.HasPrefix(key, "value") {
				continue
			}
			switch x := v.(type) {
			case string:
				vals = append(vals, x)
			case json.Number:
				vals = append(vals, x.String())
			case bool:
				vals = append(vals, strconv.FormatBool(x))
			case map[string]any:
				ref, _ := x["reference"].(string)
				if key != "valueReference" || ref == "" {
					return nil, kiln.Invalid(path+"."+key, "%s.%s is not supported: use a primitive value or valueReference", path, key)
				}
				vals = append(vals, ref)
			default:
				return nil, kiln.Invalid(path+"."+key, "%s.%s has an unsupported value", path, key)
			}
		}
		if len(vals) != 1 {
			return nil, kiln.Invalid(path, "%s (%s) must have exactly one value[x]", path, name)
		}
		out = append(out, [2]string{name, vals[0]})
	}
	return out, nil
}

type parser struct {
	req *kiln.ExportRequest
	err error
}

func (p *parser) fail(param, format string, args ...any) {
	if p.err == nil {
		p.err = kiln.Invalid(param, format, args...)
	}
}

// organized checks what organizeOutputBy=Patient can be combined with:
// blocks are a patient's compartment, so only Patient- and Group-level
// exports, only compartment types, and no separate Provenance pass (the
// compartment has the patient's Provenance already). Under lenient what
// cannot be honoured is dropped, with a warning.
func (p *parser) organized() {
	r := p.req
	if r.OrganizeOutputBy == "" {
		return
	}
	if r.Level == kiln.LevelSystem {
		p.unsupported("organizeOutputBy", "organizeOutputBy is supported on Patient- and Group-level exports, not at the system level")
		r.OrganizeOutputBy = ""
		return
	}
	if r.OutputFormat == kiln.FormatParquet {
		// Blocks mix types in one stream; a Parquet file holds one type.
		p.unsupported("organizeOutputBy", "organizeOutputBy needs NDJSON output: a Parquet file holds one resource type")
		r.OrganizeOutputBy = ""
		return
	}
	kept := r.Types[:0:0]
	for _, t := range r.Types {
		if fhir.R4().InCompartment(t) {
			kept = append(kept, t)
			continue
		}
		p.unsupported("_type", "_type %s is outside the Patient compartment, which organizeOutputBy=Patient blocks hold", t)
	}
	r.Types = kept
	if len(r.IncludeAssociatedData) > 0 {
		p.unsupported("includeAssociatedData", "includeAssociatedData cannot be combined with organizeOutputBy: each block already holds its patient's Provenance")
		r.IncludeAssociatedData = nil
	}
}

// unsupported is an error, or a warning under handling=lenient.
func (p *parser) unsupported(param, format string, args ...any) {
	if p.req.Lenient {
		p.req.Warnings = append(p.req.Warnings, kiln.Issue{Expression: param, Message: "ignored: " + fmt.Sprintf(format, args...)})
		return
	}
	p.fail(param, format+" (send Prefer: handling=lenient to have it ignored)", args...)
}

var typeFilterStart = regexp.MustCompile(`,([A-Z][A-Za-z]+(\?|%3[Ff]))`)

// splitTypeFilters reads repeated _typeFilter values and, in each, the v2
// comma-joined list of URL-encoded queries. A comma splits only where a new
// Type? query starts, so commas inside one query (OR values) survive.
func splitTypeFilters(vals []string) []string {
	var out []string
	for _, v := range vals {
		idx := typeFilterStart.FindAllStringIndex(v, -1)
		start := 0
		for _, m := range idx {
			out = append(out, v[start:m[0]])
			start = m[0] + 1
		}
		out = append(out, v[start:])
	}
	for i, f := range out {
		if strings.Contains(f, "%3F") || strings.Contains(f, "%3f") {
			if d, err := url.QueryUnescape(f); err == nil {
				out[i] = d
			}
		}
	}
	return out
}

// split joins repeated values and splits comma-joined ones.
func split(vals []string) []string {
	var out []string
	for _, v := range vals {
		for _, s := range strings.Split(v, ",") {
			if s = strings.TrimSpace(s); s != "" {
				out = append(out, s)
			}
		}
	}
	return out
}

func single(vals []string) (string, bool) {
	if len(vals) != 1 {
		return "", false
	}
	return strings.TrimSpace(vals[0]), true
}

var logLevels = map[string]string{"debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error"}

func (p *parser) param(name, raw string, vals []string) {
	r := p.req
	switch name {
	case "_outputFormat":
		v, ok := single(vals)
		if !ok {
			p.fail(raw, "_outputFormat takes one value")
			return
		}
		switch v {
		case "application/fhir+ndjson", "application/ndjson", "ndjson":
			r.OutputFormat = kiln.FormatNDJSON
		case kiln.FormatParquet, "parquet":
			r.OutputFormat = kiln.FormatParquet
		default:
			p.unsupported(raw, "_outputFormat %q is not supported: use application/fhir+ndjson (application/ndjson, ndjson) or application/vnd.apache.parquet (parquet)", v)
		}
	case "_since", "_until":
		v, ok := single(vals)
		if !ok {
			p.fail(raw, "%s takes one value", name)
			return
		}
		start, _, _, err := fhir.ParseDateTime(v)
		if err != nil {
			p.fail(raw, "%s: %v", name, err)
			return
		}
		// Both name one instant, at the store's precision (lastUpdated is kept
		// in milliseconds): a partial date is its first millisecond. _since is
		// exclusive and _until inclusive, so _until=T then _since=T covers
		// every change exactly once, and _since=<transactionTime> picks up
		// only what the export as of T did not have.
		at := start.Truncate(time.Millisecond)
		if name == "_since" {
			r.Since = &at
		} else {
			r.Until = &at
		}
	case "_type":
		if r.Types == nil {
			r.Types = []string{} // asked, even if no type of it is left
		}
		seen := map[string]bool{}
		for _, t := range split(vals) {
			if !fhir.R4().IsResourceType(t) {
				p.unsupported(raw, "_type %q is not an R4 resource type", t)
				continue
			}
			if !seen[t] {
				seen[t] = true
				r.Types = append(r.Types, t)
			}
		}
	case "_elements":
		for _, e := range split(vals) {
			if msg := checkElement(e); msg != "" {
				p.unsupported(raw, "%s", msg)
				continue
			}
			r.Elements = append(r.Elements, e)
		}
	case "patient":
		if r.Level == kiln.LevelSystem {
			p.fail(raw, "patient is not allowed on a system-level export: use Patient/$export or Group/[id]/$export")
			return
		}
		for _, v := range split(vals) {
			id := v
			if t, rest, ok := strings.Cut(v, "/"); ok {
				if !strings.EqualFold(t, "Patient") {
					p.fail(raw, "patient %q is not a Patient reference", v)
					return
				}
				id = rest
			}
			if !fhir.ValidID(id) {
				p.fail(raw, "patient %q is not a valid Patient reference or id", v)
				return
			}
			r.Patients = append(r.Patients, id)
		}
	case "includeAssociatedData":
		for _, v := range split(vals) {
			switch v {
			case LatestProvenance, RelevantProvenance:
				r.IncludeAssociatedData = append(r.IncludeAssociatedData, v)
			default:
				p.unsupported(raw, "includeAssociatedData %q is not supported: use LatestProvenanceResources or RelevantProvenanceResources", v)
			}
		}
	case "_typeFilter":
		filters := splitTypeFilters(vals)
		if len(filters) > MaxTypeFilters {
			// Each filter is evaluated on every resource of its type: a
			// bound keeps one kick-off from buying unbounded work.
			p.fail(raw, "%d _typeFilter queries; at most %d are accepted", len(filters), MaxTypeFilters)
			return
		}
		for _, f := range filters {
			if len(f) > MaxTypeFilterLength {
				p.fail(raw, "a _typeFilter of %d bytes; at most %d are accepted", len(f), MaxTypeFilterLength)
				return
			}
			q, err := fhir.ParseTypeFilter(f)
			if err != nil {
				p.unsupported(raw, "%s", kiln.ErrorMessage(err))
				continue
			}
			if r.TypeFilters == nil {
				r.TypeFilters = map[string][]string{}
			}
			_, query, _ := strings.Cut(f, "?")
			r.TypeFilters[q.Type] = append(r.TypeFilters[q.Type], query)
		}
	case "organizeOutputBy":
		v, ok := single(vals)
		switch {
		case !ok:
			p.fail(raw, "%s takes one value", name)
		case v == "Patient":
			r.OrganizeOutputBy = v
		default:
			p.unsupported(raw, "organizeOutputBy %q is not supported: use Patient", v)
		}
	case "allowPartialManifests":
		v, ok := single(vals)
		if !ok || v != "true" && v != "false" {
			p.fail(raw, "%s must be true or false, got %q", raw, strings.Join(vals, ","))
			return
		}
		r.AllowPartialManifests = v == "true"
	case "patientReferenceBatchSize":
		if n, ok := p.intParam(raw, vals, 1, MaxPatientBatch); ok {
			r.PatientReferenceBatchSize = int(n)
		}
	case "fetchResourceBatchSize":
		if n, ok := p.intParam(raw, vals, 1, MaxFetchBatch); ok {
			r.FetchResourceBatchSize = int(n)
		}
	case "uploadPartSize":
		if n, ok := p.intParam(raw, vals, MinPartSize, MaxPartSize); ok {
			r.UploadPartSize = n
		}
	case "ttlSecondsAfterFinished":
		if n, ok := p.intParam(raw, vals, 0, 1<<31-1); ok {
			v := int(n)
			r.TTLSecondsAfterFinished = &v
		}
	case "loglevel":
		v, ok := single(vals)
		lvl := logLevels[strings.ToLower(v)]
		if !ok || lvl == "" {
			p.fail(raw, "loglevel must be one of debug, info, warn, error (any case), got %q", strings.Join(vals, ","))
			return
		}
		r.LogLevel = lvl
	case "requestsMemory", "limitsMemory", "ram":
		v, ok := single(vals)
		if !ok {
			p.fail(raw, "%s takes one value", name)
			return
		}
		if _, err := ParseMemory(v); err != nil {
			p.fail(raw, "%s: %v", name, err)
			return
		}
		switch name {
		case "requestsMemory":
			r.RequestsMemory = v
		case "limitsMemory":
			r.LimitsMemory = v
		default:
			r.RAM = v
		}
	}
}

func (p *parser) intParam(raw string, vals []string, lo, hi int64) (int64, bool) {
	v, ok := single(vals)
	if !ok {
		p.fail(raw, "%s takes one value", raw)
		return 0, false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < lo || n > hi {
		p.fail(raw, "%s must be a whole number from %d to %d, got %q", raw, lo, hi, v)
		return 0, false
	}
	return n, true
}

// MaxTypeFilters and MaxTypeFilterLength bound the _typeFilter queries of
// one kick-off (in all, and each in bytes).
const (
	MaxTypeFilters      = 64
	MaxTypeFilterLength = 4096
)

var memoryPattern = regexp.MustCompile(`^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T|k)?$`)

// ParseMemory reads a memory quantity as Kubernetes writes it (512M, 2G, 2Gi)
// and returns bytes. A bare number means gigabytes, as the seed documents
// ("ram (in GB)").
func ParseMemory(s string) (int64, error) {
	m := memoryPattern.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return 0, fmt.Errorf("%q is not a memory quantity (e.g. 512M, 2G, 2Gi, or a number of GB)", s)
	}
	f, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a memory quantity", s)
	}
	mult := map[string]float64{"": 1e9, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}[m[2]]
	b := f * mult
	if b < 1<<20 || b > 1<<50 {
		return 0, fmt.Errorf("%q is outside 1 MiB to 1 PiB", s)
	}
	return int64(b), nil
}

// checkElement returns why an _elements value is not usable, or "".
func checkElement(e string) string {
	d := fhir.R4()
	typ, el, qualified := strings.Cut(e, ".")
	if qualified {
		if !d.IsResourceType(typ) {
			return fmt.Sprintf("_elements %q names an unknown resource type", e)
		}
		if strings.Contains(el, ".") {
			return fmt.Sprintf("_elements %q: only top-level elements can be selected", e)
		}
		if len(elementNames(d.Types[typ], el)) == 0 {
			return fmt.Sprintf("_elements %q: %s has no element %q", e, typ, el)
		}
		return ""
	}
	for _, rt := range d.Resources {
		if len(elementNames(d.Types[rt], e)) > 0 {
			return ""
		}
	}
	return fmt.Sprintf("_elements %q is not an element of any resource type", e)
}
