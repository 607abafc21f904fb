// Package kubernetes holds Kiln's deployment manifests; its test checks them.
package kubernetes

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/kubernetes/scheme"
)

// TestManifestsDecodeStrictly decodes every manifest with the Kubernetes API
// types of the client-go version Kiln builds with, refusing unknown or
// duplicate fields (TestKubectlDryRun checks them with kubectl as well).
func TestManifestsDecodeStrictly(t *testing.T) {
	files, _ := filepath.Glob("*.yaml")
	if len(files) < 5 {
		t.Fatalf("only %d manifests", len(files))
	}
	dec := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	kinds := map[string]bool{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range strings.Split(string(b), "\n---\n") {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			_, gvk, err := dec.Decode([]byte(doc), nil, nil)
			if err != nil {
				t.Errorf("%s document %d: %v", f, i+1, err)
				continue
			}
			kinds[gvk.Kind] = true
		}
	}
	for _, k := range []string{"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"} {
		if !kinds[k] {
			t.Errorf("no %s manifest", k)
		}
	}
}
