package fhir

import (
	"bufio"
	"compress/gzip"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkParsePrepare is the import hot path per resource: validate and
// canonicalise a body (Parse) and extract what the indexes need (Prepare),
// over the real-shaped Synthea resources of every type. One op is one
// resource. go test -bench ParsePrepare ./fhir
func BenchmarkParsePrepare(b *testing.B) {
	files, _ := filepath.Glob(filepath.Join("..", "..", "shared", "data", "synthea-r4-10", "*.ndjson.gz"))
	if len(files) == 0 {
		b.Skip("../shared/data/synthea-r4-10 not found")
	}
	var lines [][]byte
	var size int64
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			b.Fatal(err)
		}
		zr, _ := gzip.NewReader(fh)
		sc := bufio.NewScanner(zr)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			lines = append(lines, append([]byte(nil), sc.Bytes()...))
			size += int64(len(sc.Bytes()))
		}
		fh.Close()
	}
	b.SetBytes(size / int64(len(lines)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		p, err := Parse(lines[i%len(lines)])
		if err != nil {
			b.Fatal(err)
		}
		_ = Prepare(p, p.ID, Options{})
	}
}
