package kubernetes

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	openapi_v2 "github.com/google/gnostic-models/openapiv2"
	"google.golang.org/protobuf/proto"
)

// TestKubectlDryRun runs the real kubectl: `kubectl apply --dry-run=client -f
// deploy/kubernetes/` must accept every manifest, and a manifest with a
// misspelt field must be refused (so the check can fail).
//
// kubectl needs an API server for discovery and for the schema it validates
// against, and none runs on these machines. The stand-in here serves what a
// real one would from the Kubernetes v1.27 OpenAPI document that
// k8s.io/kube-openapi ships as test data: the discovery lists derived from
// its paths, the document itself at /openapi/v2, and 404 for every object
// (nothing exists yet). It does no validation of its own, so it does not
// advertise server-side field validation, and kubectl validates strictly on
// the client side against the real schema.
func TestKubectlDryRun(t *testing.T) {
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		if os.Getenv("KILN_REQUIRE_INTEGRATION") == "1" {
			t.Fatal("kubectl is not installed, and KILN_REQUIRE_INTEGRATION=1")
		}
		t.Skip("kubectl is not installed")
	}
	srv := httptest.NewServer(newAPIStandIn(t))
	defer srv.Close()
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	os.WriteFile(kubeconfig, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: standin, cluster: {server: %q}}]
users: [{name: standin, user: {token: standin}}]
contexts: [{name: standin, context: {cluster: standin, user: standin, namespace: kiln}}]
current-context: standin
`, srv.URL)), 0o600)
	run := func(path string) (string, error) {
		cmd := exec.Command(kubectl, "--kubeconfig", kubeconfig, "--cache-dir", filepath.Join(dir, "cache"), "apply", "--dry-run=client", "-f", path)
		cmd.Env = append(os.Environ(), "HOME="+dir)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}

	out, err := run(".")
	if err != nil {
		t.Fatalf("kubectl apply --dry-run=client -f deploy/kubernetes/: %v\n%s", err, out)
	}
	docs := 0
	files, _ := filepath.Glob("*.yaml")
	for _, f := range files {
		b, _ := os.ReadFile(f)
		docs += len(regexp.MustCompile(`(?m)^kind: `).FindAll(b, -1))
	}
	if got := strings.Count(out, "(dry run)"); got != docs {
		t.Fatalf("kubectl accepted %d objects of %d:\n%s", got, docs, out)
	}
	t.Logf("kubectl:\n%s", out)

	// The same Deployment with one field misspelt must be refused.
	b, err := os.ReadFile("deployment.yaml")
	if err != nil {
		t.Fatal(err)
	}
	bad := strings.Replace(string(b), "\n  replicas:", "\n  replica:", 1)
	if bad == string(b) {
		t.Fatal("deployment.yaml has no spec.replicas to misspell")
	}
	badFile := filepath.Join(dir, "bad.yaml")
	os.WriteFile(badFile, []byte(bad), 0o600)
	if out, err := run(badFile); err == nil || !strings.Contains(out, `unknown field "replica" in io.k8s.api.apps.v1.DeploymentSpec`) {
		t.Fatalf("kubectl accepted a Deployment with spec.replica: %v\n%s", err, out)
	}
}

// newAPIStandIn returns the handler described on TestKubectlDryRun.
func newAPIStandIn(t *testing.T) http.Handler {
	t.Helper()
	out, err := exec.Command("go", "mod", "download", "-json", "k8s.io/kube-openapi").Output()
	if err != nil {
		t.Fatalf("go mod download k8s.io/kube-openapi: %v", err)
	}
	var mod struct{ Dir string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		t.Fatalf("go mod download k8s.io/kube-openapi: %v %s", err, out)
	}
	raw, err := os.ReadFile(filepath.Join(mod.Dir, "pkg", "schemaconv", "testdata", "swagger.json"))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Info  struct{ Version string }
		Paths map[string]map[string]json.RawMessage
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	// This server validates nothing: take out the fieldValidation parameter
	// so that kubectl does not leave validation to it.
	var tree map[string]any
	if err := json.Unmarshal(raw, &tree); err != nil {
		t.Fatal(err)
	}
	removed := 0
	for _, item := range tree["paths"].(map[string]any) {
		for _, op := range item.(map[string]any) {
			holder, ok := op.(map[string]any) // an operation; path-level "parameters" is a list
			if !ok {
				continue
			}
			params, _ := holder["parameters"].([]any)
			kept := slices.DeleteFunc(params, func(p any) bool {
				m, _ := p.(map[string]any)
				return m["name"] == "fieldValidation"
			})
			removed += len(params) - len(kept)
			holder["parameters"] = kept
		}
		if params, ok := item.(map[string]any)["parameters"].([]any); ok {
			kept := slices.DeleteFunc(params, func(p any) bool {
				m, _ := p.(map[string]any)
				return m["name"] == "fieldValidation"
			})
			removed += len(params) - len(kept)
			item.(map[string]any)["parameters"] = kept
		}
	}
	if removed == 0 {
		t.Fatal("no fieldValidation parameter found in the OpenAPI document")
	}
	stripped, err := json.Marshal(tree)
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := openapi_v2.ParseDocument(stripped)
	if err != nil {
		t.Fatalf("parse OpenAPI document: %v", err)
	}
	pb, err := proto.Marshal(parsed)
	if err != nil {
		t.Fatal(err)
	}

	// Discovery: every collection path with a list operation names a resource.
	type apiResource struct {
		Name       string   `json:"name"`
		Namespaced bool     `json:"namespaced"`
		Kind       string   `json:"kind"`
		Verbs      []string `json:"verbs"`
	}
	lists := map[string][]apiResource{} // group/version ("v1" for core) → resources
	collection := regexp.MustCompile(`^/(?:api/(v1)|apis/([^/]+)/([^/]+))/(namespaces/\{namespace\}/)?([a-z0-9]+)$`)
	for path, ops := range doc.Paths {
		m := collection.FindStringSubmatch(path)
		get, ok := ops["get"]
		if m == nil || !ok {
			continue
		}
		var op struct {
			Action string                `json:"x-kubernetes-action"`
			GVK    struct{ Kind string } `json:"x-kubernetes-group-version-kind"`
		}
		if json.Unmarshal(get, &op) != nil || op.Action != "list" {
			continue
		}
		gv := m[1]
		if gv == "" {
			gv = m[2] + "/" + m[3]
		}
		if m[4] == "" && m[5] != "namespaces" && slices.ContainsFunc(lists[gv], func(r apiResource) bool { return r.Name == m[5] }) {
			continue // the all-namespaces list of a namespaced resource
		}
		lists[gv] = slices.DeleteFunc(lists[gv], func(r apiResource) bool { return r.Name == m[5] })
		lists[gv] = append(lists[gv], apiResource{Name: m[5], Namespaced: m[4] != "", Kind: strings.TrimSuffix(op.GVK.Kind, "List"),
			Verbs: []string{"create", "delete", "get", "list", "patch", "update", "watch"}})
	}
	if len(lists["apps/v1"]) == 0 || len(lists["v1"]) == 0 {
		t.Fatalf("no discovery derived from the OpenAPI document (%d paths)", len(doc.Paths))
	}
	groups := map[string][]string{}
	for gv := range lists {
		if g, v, ok := strings.Cut(gv, "/"); ok {
			groups[g] = append(groups[g], v)
		}
	}
	writeJSON := func(w http.ResponseWriter, status int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(v)
	}
	notFound := func(w http.ResponseWriter, what string) {
		writeJSON(w, 404, map[string]any{"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": what + " not found"})
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Path
		switch {
		case p == "/version":
			writeJSON(w, 200, map[string]string{"major": "1", "minor": "27", "gitVersion": doc.Info.Version})
		case p == "/openapi/v2":
			w.Header().Set("Content-Type", "application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
			w.Write(pb)
		case p == "/api":
			writeJSON(w, 200, map[string]any{"kind": "APIVersions", "versions": []string{"v1"}})
		case p == "/apis":
			var list []map[string]any
			for _, g := range slices.Sorted(func(yield func(string) bool) {
				for g := range groups {
					if !yield(g) {
						return
					}
				}
			}) {
				var vs []map[string]string
				for _, v := range groups[g] {
					vs = append(vs, map[string]string{"groupVersion": g + "/" + v, "version": v})
				}
				list = append(list, map[string]any{"name": g, "versions": vs, "preferredVersion": vs[0]})
			}
			writeJSON(w, 200, map[string]any{"kind": "APIGroupList", "apiVersion": "v1", "groups": list})
		case lists[strings.TrimPrefix(strings.TrimPrefix(p, "/apis/"), "/api/")] != nil:
			gv := strings.TrimPrefix(strings.TrimPrefix(p, "/apis/"), "/api/")
			writeJSON(w, 200, map[string]any{"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": lists[gv]})
		case r.Method == http.MethodGet:
			notFound(w, p) // no object exists: apply would create each one
		default:
			// A client dry run never writes; anything else is a test failure.
			t.Errorf("kubectl sent %s %s to the API server", r.Method, p)
			writeJSON(w, 405, map[string]any{"kind": "Status", "status": "Failure", "code": 405})
		}
	})
}
