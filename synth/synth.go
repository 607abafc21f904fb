// Package synth generates deterministic synthetic FHIR R4 patients with
// Synthea-like shapes and sizes, for demos and benchmarks at any scale.
package synth

import (
	"bufio"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"time"

	"github.com/kiln-fhir/kiln/fhir"
)

// Options says what to generate.
type Options struct {
	Patients int
	Seed     uint64
	// Gzip writes .ndjson.gz files.
	Gzip bool
	// GroupID is the id of the Group of all patients (default "all-patients").
	GroupID string
}

// Stats counts what was written per type.
type Stats map[string]int

// Total is the number of resources.
func (s Stats) Total() int {
	n := 0
	for _, v := range s {
		n += v
	}
	return n
}

// Generate writes one NDJSON file per type into dir.
func Generate(ctx context.Context, dir string, opt Options) (Stats, error) {
	if opt.GroupID == "" {
		opt.GroupID = "all-patients"
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	g := &gen{rng: rand.New(rand.NewPCG(opt.Seed, opt.Seed^0x9e3779b97f4a7c15)), files: map[string]*outFile{}, dir: dir, gz: opt.Gzip, stats: Stats{}}
	defer g.closeAll()
	nShared := max(opt.Patients/50, 5)
	for i := range nShared {
		g.organization(i)
		g.practitioner(i, nShared)
		g.location(i)
	}
	g.nShared = nShared
	members := make([]string, 0, opt.Patients)
	for i := range opt.Patients {
		if i%100 == 0 {
			if err := ctx.Err(); err != nil {
				return g.stats, err
			}
		}
		members = append(members, g.patient(i))
		if g.err != nil {
			return g.stats, g.err
		}
	}
	g.group(opt.GroupID, members)
	if err := g.closeAll(); err != nil {
		return g.stats, err
	}
	return g.stats, g.err
}

type outFile struct {
	f  *os.File
	gz *gzip.Writer
	w  *bufio.Writer
}

type gen struct {
	rng     *rand.Rand
	dir     string
	gz      bool
	files   map[string]*outFile
	stats   Stats
	err     error
	nShared int
	buf     []byte
}

func (g *gen) emit(typ string, b []byte) {
	if g.err != nil {
		return
	}
	f := g.files[typ]
	if f == nil {
		name := filepath.Join(g.dir, typ+".ndjson")
		if g.gz {
			name += ".gz"
		}
		osf, err := os.Create(name)
		if err != nil {
			g.err = fmt.Errorf("create %s: %w", name, err)
			return
		}
		f = &outFile{f: osf}
		var w io.Writer = osf
		if g.gz {
			f.gz, _ = gzip.NewWriterLevel(osf, gzip.BestSpeed)
			w = f.gz
		}
		f.w = bufio.NewWriterSize(w, 256<<10)
		g.files[typ] = f
	}
	f.w.Write(b)
	if err := f.w.WriteByte('\n'); err != nil {
		g.err = fmt.Errorf("write %s: %w", typ, err)
	}
	g.stats[typ]++
}

func (g *gen) closeAll() error {
	var names []string
	for n := range g.files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		f := g.files[n]
		if err := f.w.Flush(); err != nil && g.err == nil {
			g.err = err
		}
		if f.gz != nil {
			if err := f.gz.Close(); err != nil && g.err == nil {
				g.err = err
			}
		}
		if err := f.f.Close(); err != nil && g.err == nil {
			g.err = err
		}
	}
	g.files = map[string]*outFile{}
	return g.err
}

// id returns a UUID-shaped id from the generator's stream.
func (g *gen) id() string {
	a, b := g.rng.Uint64(), g.rng.Uint64()
	return fmt.Sprintf("%08x-%04x-4%03x-%04x-%012x", a>>32, (a>>16)&0xffff, a&0xfff, (b>>48)&0x3fff|0x8000, b&0xffffffffffff)
}

func (g *gen) pick(s []string) string { return s[g.rng.IntN(len(s))] }

var (
	givenNames  = []string{"Abram", "Aleta", "Alfredo", "Alyce", "Arnette", "Bertie", "Carmen", "Delmar", "Elena", "Frances", "Gus", "Hana", "Ivan", "Jolene", "Kareem", "Lucia", "Marcus", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Stefan", "Tamika", "Uri", "Vera", "Wade", "Xiomara", "Yusuf", "Zelda"}
	familyNames = []string{"Lemke", "Wintheiser", "Alaniz", "Walsh", "Bednar", "Kuhn", "Okafor", "Nguyen", "Schmidt", "Garcia", "Haddad", "Ivanova", "Johnson", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "O'Brien", "Petrov", "Quispe"}
	cities      = []string{"Boston", "Worcester", "Springfield", "Cambridge", "Lowell", "Brockton", "Quincy", "Lynn", "Fall River", "Newton"}
	obsCodes    = [][3]string{{"8302-2", "Body Height", "cm"}, {"29463-7", "Body Weight", "kg"}, {"39156-5", "Body Mass Index", "kg/m2"}, {"8867-4", "Heart rate", "/min"}, {"9279-1", "Respiratory rate", "/min"}, {"2339-0", "Glucose", "mg/dL"}, {"2093-3", "Total Cholesterol", "mg/dL"}, {"2571-8", "Triglycerides", "mg/dL"}, {"4548-4", "Hemoglobin A1c", "%"}, {"6299-2", "Urea Nitrogen", "mg/dL"}}
	conditions  = [][2]string{{"44054006", "Diabetes"}, {"38341003", "Hypertension"}, {"195662009", "Acute viral pharyngitis"}, {"10509002", "Acute bronchitis"}, {"15777000", "Prediabetes"}, {"271737000", "Anemia"}, {"55822004", "Hyperlipidemia"}, {"40055000", "Chronic sinusitis"}, {"233678006", "Childhood asthma"}, {"444814009", "Viral sinusitis"}}
	procedures  = [][2]string{{"430193006", "Medication Reconciliation"}, {"710824005", "Assessment of health and social care needs"}, {"171207006", "Depression screening"}, {"428191000124101", "Documentation of current medications"}, {"76601001", "Intramuscular injection"}}
	vaccines    = [][2]string{{"140", "Influenza, seasonal, injectable, preservative free"}, {"133", "Pneumococcal conjugate PCV 13"}, {"113", "Td (adult) preservative free"}, {"08", "Hep B, adolescent or pediatric"}, {"21", "varicella"}}
	medications = [][2]string{{"314076", "lisinopril 10 MG Oral Tablet"}, {"860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"}, {"313782", "Acetaminophen 325 MG Oral Tablet"}, {"197361", "Amlodipine 5 MG Oral Tablet"}, {"310965", "Ibuprofen 200 MG Oral Tablet"}}
	allergies   = [][2]string{{"300916003", "Latex allergy"}, {"419474003", "Allergy to mould"}, {"232350006", "House dust mite allergy"}, {"91935009", "Allergy to peanuts"}}
	encTypes    = [][2]string{{"185349003", "Encounter for check up"}, {"185345009", "Encounter for symptom"}, {"162673000", "General examination of patient"}, {"50849002", "Emergency room admission"}}
)

type patientCtx struct {
	id, name string
	birth    time.Time
}

func (g *gen) ref(typ, id string) string { return typ + "/" + id }

func q(b []byte, s string) []byte { return fhir.AppendString(b, s) }

func (g *gen) organization(i int) {
	b := g.buf[:0]
	b = append(b, `{"resourceType":"Organization","id":"org-`...)
	b = strconv.AppendInt(b, int64(i), 10)
	b = append(b, `","identifier":[{"system":"https://github.com/synthetichealth/synthea","value":"`...)
	b = append(b, g.id()...)
	b = append(b, `"}],"active":true,"type":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/organization-type","code":"prov","display":"Healthcare Provider"}],"text":"Healthcare Provider"}],"name":`...)
	b = q(b, g.pick(cities)+" Medical Center "+strconv.Itoa(i))
	b = append(b, `,"telecom":[{"system":"phone","value":"555-`...)
	b = strconv.AppendInt(b, int64(1000+g.rng.IntN(9000)), 10)
	b = append(b, `"}],"address":[{"line":["`...)
	b = strconv.AppendInt(b, int64(1+g.rng.IntN(999)), 10)
	b = append(b, ` Main Street"],"city":`...)
	b = q(b, g.pick(cities))
	b = append(b, `,"state":"MA","postalCode":"02`...)
	b = strconv.AppendInt(b, int64(100+g.rng.IntN(899)), 10)
	b = append(b, `","country":"US"}]}`...)
	g.buf = b
	g.emit("Organization", b)
}

func (g *gen) practitioner(i, n int) {
	b := g.buf[:0]
	b = append(b, `{"resourceType":"Practitioner","id":"pract-`...)
	b = strconv.AppendInt(b, int64(i), 10)
	b = append(b, `","identifier":[{"system":"http://hl7.org/fhir/sid/us-npi","value":"99999`...)
	b = strconv.AppendInt(b, int64(10000+i), 10)
	b = append(b, `"}],"active":true,"name":[{"family":`...)
	b = q(b, g.pick(familyNames)+strconv.Itoa(i))
	b = append(b, `,"given":[`...)
	b = q(b, g.pick(givenNames))
	b = append(b, `],"prefix":["Dr."]}],"telecom":[{"system":"email","value":"dr`...)
	b = strconv.AppendInt(b, int64(i), 10)
	b = append(b, `@example.com","use":"work"}],"address":[{"city":`...)
	b = q(b, g.pick(cities))
	b = append(b, `,"state":"MA","country":"US"}],"gender":"`...)
	b = append(b, g.pick([]string{"male", "female"})...)
	b = append(b, `"}`...)
	g.buf = b
	g.emit("Practitioner", b)
}

func (g *gen) location(i int) {
	b := g.buf[:0]
	b = append(b, `{"resourceType":"Location","id":"loc-`...)
	b = strconv.AppendInt(b, int64(i), 10)
	b = append(b, `","status":"active","name":`...)
	b = q(b, g.pick(cities)+" Clinic "+strconv.Itoa(i))
	b = append(b, `,"address":{"city":`...)
	b = q(b, g.pick(cities))
	b = append(b, `,"state":"MA","country":"US"},"managingOrganization":{"reference":"Organization/org-`...)
	b = strconv.AppendInt(b, int64(i), 10)
	b = append(b, `"}}`...)
	g.buf = b
	g.emit("Location", b)
}

func day(t time.Time) string     { return t.Format("2006-01-02") }
func instant(t time.Time) string { return t.Format("2006-01-02T15:04:05-07:00") }

// patient writes one patient and its history; it returns the patient id.
func (g *gen) patient(i int) string {
	p := patientCtx{id: g.id()}
	given, family := g.pick(givenNames), g.pick(familyNames)
	p.name = given + " " + family
	p.birth = time.Date(1930+g.rng.IntN(85), time.Month(1+g.rng.IntN(12)), 1+g.rng.IntN(28), 0, 0, 0, 0, time.UTC)
	gender := g.pick([]string{"male", "female"})
	b := g.buf[:0]
	b = append(b, `{"resourceType":"Patient","id":"`...)
	b = append(b, p.id...)
	b = append(b, `","text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">Generated by Kiln synth. Seeded patient `...)
	b = strconv.AppendInt(b, int64(i), 10)
	b = append(b, `</div>"},"extension":[{"url":"http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex","valueCode":"`...)
	b = append(b, gender[:1]...)
	b = append(b, `"}],"identifier":[{"system":"https://github.com/synthetichealth/synthea","value":"`...)
	b = append(b, p.id...)
	b = append(b, `"},{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"MR","display":"Medical Record Number"}],"text":"Medical Record Number"},"system":"http://hospital.smarthealthit.org","value":"MRN-`...)
	b = strconv.AppendInt(b, int64(100000+i), 10)
	b = append(b, `"},{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"SS","display":"Social Security Number"}],"text":"Social Security Number"},"system":"http://hl7.org/fhir/sid/us-ssn","value":"999-`...)
	b = strconv.AppendInt(b, int64(10+g.rng.IntN(89)), 10)
	b = append(b, `-`...)
	b = strconv.AppendInt(b, int64(1000+g.rng.IntN(8999)), 10)
	b = append(b, `"}],"name":[{"use":"official","family":`...)
	b = q(b, family)
	b = append(b, `,"given":[`...)
	b = q(b, given)
	b = append(b, `]}],"telecom":[{"system":"phone","value":"555-`...)
	b = strconv.AppendInt(b, int64(1000+g.rng.IntN(9000)), 10)
	b = append(b, `","use":"home"}],"gender":"`...)
	b = append(b, gender...)
	b = append(b, `","birthDate":"`...)
	b = append(b, day(p.birth)...)
	b = append(b, `","address":[{"line":["`...)
	b = strconv.AppendInt(b, int64(1+g.rng.IntN(999)), 10)
	b = append(b, ` Elm Street"],"city":`...)
	b = q(b, g.pick(cities))
	b = append(b, `,"state":"MA","country":"US"}],"maritalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-MaritalStatus","code":"M","display":"M"}],"text":"M"},"multipleBirthBoolean":false,"communication":[{"language":{"coding":[{"system":"urn:ietf:bcp:47","code":"en-US","display":"English"}],"text":"English"}}]}`...)
	g.buf = b
	g.emit("Patient", b)

	shared := g.rng.IntN(g.nShared)
	org, pract, loc := "org-"+strconv.Itoa(shared), "pract-"+strconv.Itoa(shared), "loc-"+strconv.Itoa(shared)
	for range g.rng.IntN(3) {
		g.allergy(p, pract)
	}
	var conds []string
	for range 3 + g.rng.IntN(8) {
		conds = append(conds, g.condition(p))
	}
	encounters := 25 + g.rng.IntN(20)
	start := p.birth.AddDate(1+g.rng.IntN(10), 0, 0)
	for e := range encounters {
		when := start.Add(time.Duration(e) * 300 * 24 * time.Hour / time.Duration(1+encounters/20)).Add(time.Duration(g.rng.IntN(9*3600)) * time.Second)
		enc := g.encounter(p, when, org, pract, loc)
		// As in Synthea's Provenance, the patient is a target too: that puts
		// the Provenance in the patient's compartment.
		targets := []string{"Patient/" + p.id, "Encounter/" + enc}
		var obs []string
		for range 3 + g.rng.IntN(4) {
			obs = append(obs, g.observation(p, enc, when, pract))
		}
		for _, o := range obs {
			targets = append(targets, "Observation/"+o)
		}
		if g.rng.IntN(10) < 3 {
			targets = append(targets, "DiagnosticReport/"+g.diagnosticReport(p, enc, when, obs, pract))
		}
		if g.rng.IntN(10) < 7 {
			targets = append(targets, "Procedure/"+g.procedure(p, enc, when, loc))
		}
		if g.rng.IntN(10) < 3 {
			targets = append(targets, "MedicationRequest/"+g.medicationRequest(p, enc, when, pract))
		}
		if g.rng.IntN(10) < 4 {
			targets = append(targets, "Immunization/"+g.immunization(p, enc, when, loc))
		}
		claim := g.claim(p, enc, when, org, pract, conds)
		targets = append(targets, "Claim/"+claim)
		targets = append(targets, "ExplanationOfBenefit/"+g.eob(p, enc, claim, when, org, pract))
		g.provenance(enc, when, org, pract, targets)
	}
	return p.id
}

func (g *gen) header(typ, id string) []byte {
	b := g.buf[:0]
	b = append(b, `{"resourceType":"`...)
	b = append(b, typ...)
	b = append(b, `","id":"`...)
	b = append(b, id...)
	return append(b, `"`...)
}

func coding(b []byte, system, code, display string) []byte {
	b = append(b, `{"coding":[{"system":"`...)
	b = append(b, system...)
	b = append(b, `","code":"`...)
	b = append(b, code...)
	b = append(b, `","display":`...)
	b = q(b, display)
	b = append(b, `}],"text":`...)
	b = q(b, display)
	return append(b, '}')
}

func refTo(b []byte, key, ref string) []byte {
	b = append(b, `,"`...)
	b = append(b, key...)
	b = append(b, `":{"reference":"`...)
	b = append(b, ref...)
	return append(b, `"}`...)
}

func (g *gen) allergy(p patientCtx, pract string) {
	id := g.id()
	a := allergies[g.rng.IntN(len(allergies))]
	b := g.header("AllergyIntolerance", id)
	b = append(b, `,"clinicalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical","code":"active"}]},"verificationStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/allergyintolerance-verification","code":"confirmed"}]},"type":"allergy","category":["environment"],"criticality":"low","code":`...)
	b = coding(b, "http://snomed.info/sct", a[0], a[1])
	b = refTo(b, "patient", "Patient/"+p.id)
	b = append(b, `,"recordedDate":"`...)
	b = append(b, instant(p.birth.AddDate(5, 0, 0))...)
	b = append(b, `"`...)
	b = refTo(b, "recorder", "Practitioner/"+pract)
	b = append(b, '}')
	g.buf = b
	g.emit("AllergyIntolerance", b)
}

func (g *gen) condition(p patientCtx) string {
	id := g.id()
	c := conditions[g.rng.IntN(len(conditions))]
	onset := p.birth.AddDate(2+g.rng.IntN(40), g.rng.IntN(12), 0)
	b := g.header("Condition", id)
	b = append(b, `,"clinicalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/condition-clinical","code":"active"}]},"verificationStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/condition-ver-status","code":"confirmed"}]},"category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/condition-category","code":"encounter-diagnosis","display":"Encounter Diagnosis"}]}],"code":`...)
	b = coding(b, "http://snomed.info/sct", c[0], c[1])
	b = refTo(b, "subject", "Patient/"+p.id)
	b = append(b, `,"onsetDateTime":"`...)
	b = append(b, instant(onset)...)
	b = append(b, `","recordedDate":"`...)
	b = append(b, instant(onset)...)
	b = append(b, `"}`...)
	g.buf = b
	g.emit("Condition", b)
	return id
}

func (g *gen) encounter(p patientCtx, when time.Time, org, pract, loc string) string {
	id := g.id()
	t := encTypes[g.rng.IntN(len(encTypes))]
	b := g.header("Encounter", id)
	b = append(b, `,"status":"finished","class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"},"type":[`...)
	b = coding(b, "http://snomed.info/sct", t[0], t[1])
	b = append(b, `]`...)
	b = refTo(b, "subject", "Patient/"+p.id)
	b = append(b, `,"participant":[{"type":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ParticipationType","code":"PPRF","display":"primary performer"}],"text":"primary performer"}],"period":{"start":"`...)
	b = append(b, instant(when)...)
	b = append(b, `","end":"`...)
	b = append(b, instant(when.Add(30*time.Minute))...)
	b = append(b, `"},"individual":{"reference":"Practitioner/`...)
	b = append(b, pract...)
	b = append(b, `","display":"Dr. `...)
	b = append(b, pract...)
	b = append(b, `"}}],"period":{"start":"`...)
	b = append(b, instant(when)...)
	b = append(b, `","end":"`...)
	b = append(b, instant(when.Add(30*time.Minute))...)
	b = append(b, `"},"location":[{"location":{"reference":"Location/`...)
	b = append(b, loc...)
	b = append(b, `"}}]`...)
	b = refTo(b, "serviceProvider", "Organization/"+org)
	b = append(b, '}')
	g.buf = b
	g.emit("Encounter", b)
	return id
}

func (g *gen) observation(p patientCtx, enc string, when time.Time, pract string) string {
	id := g.id()
	c := obsCodes[g.rng.IntN(len(obsCodes))]
	cat := "vital-signs"
	if g.rng.IntN(2) == 0 {
		cat = "laboratory"
	}
	b := g.header("Observation", id)
	b = append(b, `,"status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"`...)
	b = append(b, cat...)
	b = append(b, `","display":"`...)
	b = append(b, cat...)
	b = append(b, `"}]}],"code":`...)
	b = coding(b, "http://loinc.org", c[0], c[1])
	b = refTo(b, "subject", "Patient/"+p.id)
	b = refTo(b, "encounter", "Encounter/"+enc)
	b = append(b, `,"effectiveDateTime":"`...)
	b = append(b, instant(when)...)
	b = append(b, `","issued":"`...)
	b = append(b, fhir.FormatInstant(when)...)
	b = append(b, `","performer":[{"reference":"Practitioner/`...)
	b = append(b, pract...)
	b = append(b, `"}],"valueQuantity":{"value":`...)
	b = strconv.AppendFloat(b, float64(g.rng.IntN(20000))/100, 'f', 2, 64)
	b = append(b, `,"unit":"`...)
	b = append(b, c[2]...)
	b = append(b, `","system":"http://unitsofmeasure.org","code":"`...)
	b = append(b, c[2]...)
	b = append(b, `"}}`...)
	g.buf = b
	g.emit("Observation", b)
	return id
}

func (g *gen) diagnosticReport(p patientCtx, enc string, when time.Time, obs []string, pract string) string {
	id := g.id()
	b := g.header("DiagnosticReport", id)
	b = append(b, `,"status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0074","code":"LAB","display":"Laboratory"}]}],"code":`...)
	b = coding(b, "http://loinc.org", "51990-0", "Basic Metabolic Panel")
	b = refTo(b, "subject", "Patient/"+p.id)
	b = refTo(b, "encounter", "Encounter/"+enc)
	b = append(b, `,"effectiveDateTime":"`...)
	b = append(b, instant(when)...)
	b = append(b, `","issued":"`...)
	b = append(b, fhir.FormatInstant(when)...)
	b = append(b, `","performer":[{"reference":"Practitioner/`...)
	b = append(b, pract...)
	b = append(b, `"}],"result":[`...)
	for i, o := range obs {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"reference":"Observation/`...)
		b = append(b, o...)
		b = append(b, `"}`...)
	}
	b = append(b, `]}`...)
	g.buf = b
	g.emit("DiagnosticReport", b)
	return id
}

func (g *gen) procedure(p patientCtx, enc string, when time.Time, loc string) string {
	c := procedures[g.rng.IntN(len(procedures))]
	id := g.id()
	b := g.header("Procedure", id)
	b = append(b, `,"status":"completed","code":`...)
	b = coding(b, "http://snomed.info/sct", c[0], c[1])
	b = refTo(b, "subject", "Patient/"+p.id)
	b = refTo(b, "encounter", "Encounter/"+enc)
	b = append(b, `,"performedPeriod":{"start":"`...)
	b = append(b, instant(when)...)
	b = append(b, `","end":"`...)
	b = append(b, instant(when.Add(15*time.Minute))...)
	b = append(b, `"}`...)
	b = refTo(b, "location", "Location/"+loc)
	b = append(b, '}')
	g.buf = b
	g.emit("Procedure", b)
	return id
}

func (g *gen) medicationRequest(p patientCtx, enc string, when time.Time, pract string) string {
	m := medications[g.rng.IntN(len(medications))]
	id := g.id()
	b := g.header("MedicationRequest", id)
	b = append(b, `,"status":"`...)
	b = append(b, g.pick([]string{"active", "stopped", "completed"})...)
	b = append(b, `","intent":"order","medicationCodeableConcept":`...)
	b = coding(b, "http://www.nlm.nih.gov/research/umls/rxnorm", m[0], m[1])
	b = refTo(b, "subject", "Patient/"+p.id)
	b = refTo(b, "encounter", "Encounter/"+enc)
	b = append(b, `,"authoredOn":"`...)
	b = append(b, instant(when)...)
	b = append(b, `"`...)
	b = refTo(b, "requester", "Practitioner/"+pract)
	b = append(b, `,"dosageInstruction":[{"sequence":1,"timing":{"repeat":{"frequency":1,"period":1,"periodUnit":"d"}},"asNeededBoolean":false,"doseAndRate":[{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/dose-rate-type","code":"ordered","display":"Ordered"}]},"doseQuantity":{"value":1}}]}]}`...)
	g.buf = b
	g.emit("MedicationRequest", b)
	return id
}

func (g *gen) immunization(p patientCtx, enc string, when time.Time, loc string) string {
	v := vaccines[g.rng.IntN(len(vaccines))]
	id := g.id()
	b := g.header("Immunization", id)
	b = append(b, `,"status":"completed","vaccineCode":`...)
	b = coding(b, "http://hl7.org/fhir/sid/cvx", v[0], v[1])
	b = refTo(b, "patient", "Patient/"+p.id)
	b = refTo(b, "encounter", "Encounter/"+enc)
	b = append(b, `,"occurrenceDateTime":"`...)
	b = append(b, instant(when)...)
	b = append(b, `","primarySource":true`...)
	b = refTo(b, "location", "Location/"+loc)
	b = append(b, '}')
	g.buf = b
	g.emit("Immunization", b)
	return id
}

func (g *gen) claim(p patientCtx, enc string, when time.Time, org, pract string, conds []string) string {
	id := g.id()
	b := g.header("Claim", id)
	b = append(b, `,"status":"active","type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/claim-type","code":"professional"}]},"use":"claim"`...)
	b = refTo(b, "patient", "Patient/"+p.id)
	b = append(b, `,"billablePeriod":{"start":"`...)
	b = append(b, instant(when)...)
	b = append(b, `","end":"`...)
	b = append(b, instant(when.Add(time.Hour))...)
	b = append(b, `"},"created":"`...)
	b = append(b, instant(when.Add(time.Hour))...)
	b = append(b, `"`...)
	b = refTo(b, "provider", "Organization/"+org)
	b = append(b, `,"priority":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/processpriority","code":"normal"}]},"diagnosis":[{"sequence":1,"diagnosisReference":{"reference":"Condition/`...)
	b = append(b, conds[g.rng.IntN(len(conds))]...)
	b = append(b, `"}}],"insurance":[{"sequence":1,"focal":true,"coverage":{"display":"Medicaid"}}],"item":[{"sequence":1,"productOrService":`...)
	b = coding(b, "http://snomed.info/sct", "185349003", "Encounter for check up")
	b = append(b, `,"encounter":[{"reference":"Encounter/`...)
	b = append(b, enc...)
	b = append(b, `"}]},{"sequence":2,"productOrService":`...)
	b = coding(b, "http://snomed.info/sct", "430193006", "Medication Reconciliation (procedure)")
	b = append(b, `,"net":{"value":`...)
	b = strconv.AppendFloat(b, float64(g.rng.IntN(100000))/100, 'f', 2, 64)
	b = append(b, `,"currency":"USD"}}],"total":{"value":`...)
	b = strconv.AppendFloat(b, float64(g.rng.IntN(200000))/100, 'f', 2, 64)
	b = append(b, `,"currency":"USD"}}`...)
	g.buf = b
	g.emit("Claim", b)
	return id
}

func (g *gen) eob(p patientCtx, enc, claim string, when time.Time, org, pract string) string {
	id := g.id()
	b := g.header("ExplanationOfBenefit", id)
	b = append(b, `,"contained":[{"resourceType":"ServiceRequest","id":"referral","status":"completed","intent":"order","subject":{"reference":"Patient/`...)
	b = append(b, p.id...)
	b = append(b, `"},"requester":{"reference":"Practitioner/`...)
	b = append(b, pract...)
	b = append(b, `"},"performer":[{"reference":"Practitioner/`...)
	b = append(b, pract...)
	b = append(b, `"}]},{"resourceType":"Coverage","id":"coverage","status":"active","type":{"text":"Medicaid"},"beneficiary":{"reference":"Patient/`...)
	b = append(b, p.id...)
	b = append(b, `"},"payor":[{"display":"Medicaid"}]}],"identifier":[{"system":"https://bluebutton.cms.gov/resources/variables/clm_id","value":"`...)
	b = append(b, claim...)
	b = append(b, `"},{"system":"https://bluebutton.cms.gov/resources/identifier/claim-group","value":"`...)
	b = strconv.AppendInt(b, int64(g.rng.IntN(1e9)), 10)
	b = append(b, `"}],"status":"active","type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/claim-type","code":"professional","display":"Professional"}]},"use":"claim"`...)
	b = refTo(b, "patient", "Patient/"+p.id)
	b = append(b, `,"billablePeriod":{"start":"`...)
	b = append(b, instant(when)...)
	b = append(b, `","end":"`...)
	b = append(b, instant(when.AddDate(1, 0, 0))...)
	b = append(b, `"},"created":"`...)
	b = append(b, instant(when.Add(time.Hour))...)
	b = append(b, `","insurer":{"display":"Medicaid"}`...)
	b = refTo(b, "provider", "Practitioner/"+pract)
	b = append(b, `,"referral":{"reference":"#referral"}`...)
	b = refTo(b, "claim", "Claim/"+claim)
	b = append(b, `,"outcome":"complete","careTeam":[{"sequence":1,"provider":{"reference":"Practitioner/`...)
	b = append(b, pract...)
	b = append(b, `"},"role":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/claimcareteamrole","code":"primary","display":"Primary provider"}]}}],"insurance":[{"focal":true,"coverage":{"reference":"#coverage","display":"Medicaid"}}],"item":[{"sequence":1,"productOrService":`...)
	b = coding(b, "http://snomed.info/sct", "185349003", "Encounter for check up")
	b = append(b, `,"servicedPeriod":{"start":"`...)
	b = append(b, instant(when)...)
	b = append(b, `","end":"`...)
	b = append(b, instant(when.Add(time.Hour))...)
	b = append(b, `"},"locationCodeableConcept":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/ex-serviceplace","code":"19","display":"Off Campus-Outpatient Hospital"}]},"encounter":[{"reference":"Encounter/`...)
	b = append(b, enc...)
	b = append(b, `"}],"adjudication":[{"category":{"coding":[{"system":"https://bluebutton.cms.gov/resources/codesystem/adjudication","code":"https://bluebutton.cms.gov/resources/variables/line_coinsrnc_amt","display":"Line Beneficiary Coinsurance Amount"}]},"amount":{"value":`...)
	b = strconv.AppendFloat(b, float64(g.rng.IntN(10000))/100, 'f', 2, 64)
	b = append(b, `,"currency":"USD"}},{"category":{"coding":[{"system":"https://bluebutton.cms.gov/resources/codesystem/adjudication","code":"https://bluebutton.cms.gov/resources/variables/line_prvdr_pmt_amt","display":"Line Provider Payment Amount"}]},"amount":{"value":`...)
	b = strconv.AppendFloat(b, float64(g.rng.IntN(50000))/100, 'f', 2, 64)
	b = append(b, `,"currency":"USD"}}]}],"total":[{"category":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/adjudication","code":"submitted","display":"Submitted Amount"}],"text":"Submitted Amount"},"amount":{"value":`...)
	b = strconv.AppendFloat(b, float64(g.rng.IntN(100000))/100, 'f', 2, 64)
	b = append(b, `,"currency":"USD"}}],"payment":{"amount":{"value":`...)
	b = strconv.AppendFloat(b, float64(g.rng.IntN(50000))/100, 'f', 2, 64)
	b = append(b, `,"currency":"USD"}}}`...)
	g.buf = b
	g.emit("ExplanationOfBenefit", b)
	return id
}

// provenance writes the Provenance of one encounter's resources, as Synthea
// writes one per bundle. Its id derives from the encounter's and it draws
// nothing from the random stream, so the other resources are the same
// whether or not Provenance is generated.
func (g *gen) provenance(enc string, when time.Time, org, pract string, targets []string) {
	b := g.header("Provenance", "prov-"+enc)
	b = append(b, `,"target":[`...)
	for i, t := range targets {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"reference":`...)
		b = q(b, t)
		b = append(b, '}')
	}
	b = append(b, `],"recorded":"`...)
	b = append(b, fhir.FormatInstant(when.Add(30*time.Minute))...)
	b = append(b, `","agent":[{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/provenance-participant-type","code":"author","display":"Author"}],"text":"Author"}`...)
	b = refTo(b, "who", "Practitioner/"+pract)
	b = refTo(b, "onBehalfOf", "Organization/"+org)
	b = append(b, `},{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/provenance-participant-type","code":"transmitter","display":"Transmitter"}],"text":"Transmitter"}`...)
	b = refTo(b, "who", "Organization/"+org)
	b = append(b, `}]}`...)
	g.buf = b
	g.emit("Provenance", b)
}

func (g *gen) group(id string, members []string) {
	b := g.buf[:0]
	b = append(b, `{"resourceType":"Group","id":`...)
	b = q(b, id)
	b = append(b, `,"identifier":[{"system":"https://kiln.example/groups","value":`...)
	b = q(b, id)
	b = append(b, `}],"active":true,"type":"person","actual":true,"name":"All generated patients","quantity":`...)
	b = strconv.AppendInt(b, int64(len(members)), 10)
	if len(members) > 0 {
		b = append(b, `,"member":[`...)
		for i, m := range members {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"entity":{"reference":"Patient/`...)
			b = append(b, m...)
			b = append(b, `"}}`...)
		}
		b = append(b, ']')
	}
	b = append(b, '}')
	g.buf = b
	g.emit("Group", b)
}
