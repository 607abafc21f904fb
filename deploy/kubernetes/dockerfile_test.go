package kubernetes

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestDockerfileBuildsStaticBinary runs the Dockerfile's build step as it is
// written (there is no Docker engine on these machines) and checks that the
// binary needs nothing from the image: no ELF interpreter and no shared
// libraries, as distroless/static requires; and that it runs.
func TestDockerfileBuildsStaticBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds kiln")
	}
	root, _ := filepath.Abs(filepath.Join("..", ".."))
	df, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var step string
	for _, l := range strings.Split(string(df), "\n") {
		if s, ok := strings.CutPrefix(l, "RUN "); ok && strings.Contains(s, "go build") {
			step = s
		}
	}
	if !strings.Contains(step, " -o /kiln ") {
		t.Fatalf("no `RUN … go build … -o /kiln …` step in the Dockerfile: %q", step)
	}
	bin := filepath.Join(t.TempDir(), "kiln")
	cmd := exec.Command("sh", "-c", strings.Replace(step, " -o /kiln ", " -o "+bin+" ", 1))
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", step, err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the binary asks for an ELF interpreter: it is not static")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("the binary needs shared libraries: %v", libs)
	}
	if out, err := exec.Command(bin, "version").CombinedOutput(); err != nil || !strings.HasPrefix(string(out), "kiln ") {
		t.Fatalf("kiln version: %v %s", err, out)
	}
}
