// Package localfs is the export Sink on the local file system: one folder per
// job under a root folder, served by Kiln's own file endpoint.
package localfs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/kiln-fhir/kiln"
)

// Sink writes export files below Root.
type Sink struct {
	Root string
}

// New returns a Sink rooted at dir, creating it.
func New(dir string) (*Sink, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create export folder: %w", err)
	}
	return &Sink{Root: dir}, nil
}

func (s *Sink) path(job, name string) (string, error) {
	// Names come from the engine, but a job id or name must never escape the root.
	if job == "" || strings.ContainsAny(job, `/\`) || job == ".." || name == "" || strings.ContainsAny(name, `/\`) || name == ".." {
		return "", kiln.Errorf(kiln.ENOTFOUND, "no such file")
	}
	return filepath.Join(s.Root, job, name), nil
}

type file struct {
	f *os.File
	*bufio.Writer
}

func (f *file) Close() error {
	err := f.Flush()
	if err == nil {
		err = f.f.Sync()
	}
	return errors.Join(err, f.f.Close())
}

// Create implements kiln.Sink.
func (s *Sink) Create(ctx context.Context, job, name string, _ kiln.WriteOptions) (io.WriteCloser, error) {
	p, err := s.path(job, name)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return nil, fmt.Errorf("create job folder: %w", err)
	}
	// Health records: owner-only, whatever the umask.
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", name, err)
	}
	return &file{f: f, Writer: bufio.NewWriterSize(f, 256<<10)}, nil
}

// Open implements kiln.Sink.
func (s *Sink) Open(ctx context.Context, job, name string) (io.ReadCloser, error) {
	p, err := s.path(job, name)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "file %s of job %s is gone", name, job)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", name, err)
	}
	return f, nil
}

// RemovePrefix implements kiln.Sink.
func (s *Sink) RemovePrefix(ctx context.Context, job, prefix string) error {
	dir := filepath.Join(s.Root, job)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list job files: %w", err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("remove %s: %w", e.Name(), err)
			}
		}
	}
	return nil
}

// RemoveJob implements kiln.Sink.
func (s *Sink) RemoveJob(ctx context.Context, job string) error {
	if _, err := s.path(job, "x"); err != nil {
		return nil
	}
	if err := os.RemoveAll(filepath.Join(s.Root, job)); err != nil {
		return fmt.Errorf("remove job files: %w", err)
	}
	return nil
}

var _ kiln.Sink = (*Sink)(nil)

// Location implements kiln.LocatedSink: file:// and the root's absolute path.
func (s *Sink) Location() string {
	abs, err := filepath.Abs(s.Root)
	if err != nil {
		abs = s.Root
	}
	return "file://" + filepath.ToSlash(abs)
}

// At implements kiln.LocatedSink: the folder of a file:// location.
func (s *Sink) At(loc string) (kiln.Sink, error) {
	dir, ok := strings.CutPrefix(loc, "file://")
	if !ok || !filepath.IsAbs(filepath.FromSlash(dir)) {
		return nil, kiln.Errorf(kiln.EINVALID, "localfs: %q is not a file:///absolute/path location", loc)
	}
	return New(filepath.FromSlash(dir))
}
