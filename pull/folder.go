package pull

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// A pull folder holds the files of every committed run, manifest.json and
// the state of the current run. A run downloads into the staging folder;
// only when every file is verified is it committed:
//
//  1. for --since-last, earlier files lose the lines of resources the run
//     deleted or exported again (each file rewritten to a temporary name,
//     synced, renamed);
//  2. the staged files are moved into the folder;
//  3. manifest.json — the server's manifest plus the folder's file list with
//     a SHA-256 per file, and the run's id — is written the same way: this
//     is the commit point, and its transactionTime the --since-last watermark;
//  4. the state is marked completed and the staging folder removed.
//
// Every step can be repeated, so a run killed anywhere is finished by
// --resume exactly as if it had not been: the increment applies once, and
// the watermark never comes from an unfinished run.

const stagingDir = ".kiln-pull-staging"

func (c *Client) staging() string { return filepath.Join(c.opt.Out, stagingDir) }

// LocalFile is one data file of the folder, as manifest.json lists it.
type LocalFile struct {
	File   string `json:"file"`
	Kind   Kind   `json:"kind"`
	Type   string `json:"type,omitempty"`
	Lines  int64  `json:"lines"`
	Bytes  int64  `json:"bytes"`
	SHA256 string `json:"sha256"`
	// Modified is the file's modification time when it was hashed: a file
	// whose size and time are unchanged keeps its entry without rehashing.
	Modified time.Time `json:"modified"`
}

// localManifest is what manifest.json adds to the server's manifest.
type localManifest struct {
	RunID string      `json:"kilnPullRun"`
	Files []LocalFile `json:"kilnPullFiles"`
}

func readLocalManifest(dir string) (*localManifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return nil, err
	}
	var lm localManifest
	if err := json.Unmarshal(b, &lm); err != nil {
		return nil, fmt.Errorf("manifest.json: %w", err)
	}
	return &lm, nil
}

// committed reports whether the run already passed its commit point.
func (c *Client) committed(st *State) (bool, error) {
	lm, err := readLocalManifest(c.opt.Out)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return lm.RunID == st.RunID, nil
}

// commit moves a verified run into the folder (see the steps above).
func (c *Client) commit(st *State, m *Manifest, files []checked, res *Result) error {
	changed := map[string]LocalFile{}
	if st.Incremental {
		deleted, updated := map[string]bool{}, map[string]bool{}
		for _, f := range files {
			for _, k := range f.keys {
				if f.kind == KindDeleted {
					deleted[k] = true
				} else {
					updated[k] = true
				}
			}
		}
		removed, err := c.applyIncrement(st.RunID, deleted, updated, changed)
		if err != nil {
			return err
		}
		res.Increment = Increment{Deleted: len(deleted), Updated: len(updated), Removed: removed}
	}
	for _, f := range files {
		from := filepath.Join(c.staging(), f.name)
		if _, err := os.Stat(from); errors.Is(err, os.ErrNotExist) {
			continue // moved by a commit a crash cut short
		}
		if err := os.Rename(from, filepath.Join(c.opt.Out, f.name)); err != nil {
			return err
		}
		c.failpoint(StepMoved)
	}
	if err := syncDir(c.opt.Out); err != nil {
		return err
	}
	list, err := c.listFolder(files, changed)
	if err != nil {
		return err
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(m.raw, &doc); err != nil {
		return fmt.Errorf("the server's manifest: %w", err)
	}
	doc["kilnPullRun"], _ = json.Marshal(st.RunID)
	doc["kilnPullFiles"], _ = json.Marshal(list)
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := writeAtomic(filepath.Join(c.opt.Out, "manifest.json.tmp"), filepath.Join(c.opt.Out, "manifest.json"), b); err != nil {
		return err
	}
	c.failpoint(StepManifested)
	st.Completed = true
	if err := c.save(st); err != nil {
		return err
	}
	return os.RemoveAll(c.staging())
}

// listFolder describes every data file now in the folder: this run's from
// their verification, rewritten ones from the rewrite, the rest from the
// previous manifest.json when their size and time are unchanged, else
// hashed again.
func (c *Client) listFolder(files []checked, changed map[string]LocalFile) ([]LocalFile, error) {
	known := map[string]LocalFile{}
	if lm, err := readLocalManifest(c.opt.Out); err == nil {
		for _, f := range lm.Files {
			known[f.File] = f
		}
	}
	for name, f := range changed {
		known[name] = f
	}
	run := map[string]checked{}
	for _, f := range files {
		run[f.name] = f
	}
	paths, err := dataFiles(c.opt.Out)
	if err != nil {
		return nil, err
	}
	var out []LocalFile
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			return nil, err
		}
		name := filepath.Base(p)
		if f, ok := run[name]; ok {
			out = append(out, f.local(fi.ModTime()))
			continue
		}
		if f, ok := known[name]; ok && f.Bytes == fi.Size() && f.Modified.Equal(fi.ModTime()) {
			out = append(out, f)
			continue
		}
		kind, typ := kindOf(name)
		got, err := verify(p, File{Type: typ}, kind)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, got.local(fi.ModTime()))
	}
	return out, nil
}

// dataFiles lists the folder's data files (NDJSON and Parquet), sorted.
func dataFiles(dir string) ([]string, error) {
	var paths []string
	for _, pat := range []string{"*.ndjson", "*.parquet"} {
		p, err := filepath.Glob(filepath.Join(dir, pat))
		if err != nil {
			return nil, err
		}
		paths = append(paths, p...)
	}
	sort.Strings(paths)
	return paths, nil
}

// kindOf reads a file's kind and type from its name (TYPE.RUN.NNN.ndjson,
// deleted.RUN.NNN.ndjson, error.RUN.NNN.ndjson).
func kindOf(name string) (Kind, string) {
	first, _, _ := strings.Cut(name, ".")
	switch Kind(first) {
	case KindDeleted:
		return KindDeleted, ""
	case KindError:
		return KindError, "OperationOutcome"
	}
	return KindOutput, first
}

// Increment says what an incremental run changed in the folder.
type Increment struct {
	Deleted, Updated int // resources the run deleted, exported again or anew
	Removed          int // older lines removed from earlier files
}

// applyIncrement removes, from the earlier runs' output files, the lines of
// resources this run deleted or exported again; each rewritten file is
// recorded in changed.
func (c *Client) applyIncrement(runID string, deleted, updated map[string]bool, changed map[string]LocalFile) (int, error) {
	paths, err := filepath.Glob(filepath.Join(c.opt.Out, "*.ndjson"))
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, path := range paths {
		name := filepath.Base(path)
		kind, typ := kindOf(name)
		if kind != KindOutput || strings.Contains(name, "."+runID+".") {
			continue
		}
		n, f, err := rewriteWithout(path, typ, func(key string) bool { return deleted[key] || updated[key] })
		if err != nil {
			return removed, fmt.Errorf("%s: %w", name, err)
		}
		if n > 0 {
			removed += n
			changed[name] = f
			c.failpoint(StepApplied)
		}
	}
	return removed, nil
}

// rewriteWithout streams path to a temporary file without the lines whose
// key drop reports, and replaces path with it (synced) if any was dropped.
func rewriteWithout(path, typ string, drop func(string) bool) (int, LocalFile, error) {
	in, err := os.Open(path)
	if err != nil {
		return 0, LocalFile{}, err
	}
	defer in.Close()
	tmp := path + ".tmp"
	out, err := createPrivate(tmp)
	if err != nil {
		return 0, LocalFile{}, err
	}
	defer os.Remove(tmp)
	defer out.Close()
	h := sha256.New()
	w := bufio.NewWriterSize(io.MultiWriter(out, h), 256<<10)
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 256<<20)
	removed := 0
	f := LocalFile{File: filepath.Base(path), Kind: KindOutput, Type: typ}
	for sc.Scan() {
		line := sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var r struct{ ResourceType, ID string }
		if err := json.Unmarshal(line, &r); err != nil {
			return 0, LocalFile{}, fmt.Errorf("line %d is not JSON: %w", f.Lines+int64(removed)+1, err)
		}
		if drop(r.ResourceType + "/" + r.ID) {
			removed++
			continue
		}
		w.Write(line)
		w.WriteByte('\n')
		f.Lines++
		f.Bytes += int64(len(line)) + 1
	}
	if err := sc.Err(); err != nil {
		return 0, LocalFile{}, err
	}
	if removed == 0 {
		return 0, f, nil
	}
	if err := w.Flush(); err != nil {
		return 0, LocalFile{}, err
	}
	if err := out.Sync(); err != nil {
		return 0, LocalFile{}, err
	}
	if err := out.Close(); err != nil {
		return 0, LocalFile{}, err
	}
	if err := os.Rename(tmp, path); err != nil {
		return 0, LocalFile{}, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return 0, LocalFile{}, err
	}
	f.SHA256, f.Modified = hex.EncodeToString(h.Sum(nil)), fi.ModTime()
	return removed, f, syncDir(filepath.Dir(path))
}

// createPrivate creates (or truncates) a file only its owner may read: a
// pull folder holds health records, whatever the umask.
func createPrivate(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	// A file left by an earlier run keeps its mode when reopened: set it.
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// writeAtomic writes b to tmp, syncs it and renames it to path.
func writeAtomic(tmp, path string, b []byte) error {
	f, err := createPrivate(tmp)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

// syncDir makes renames in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// VerifyFolder checks a pull folder against its manifest.json: every listed
// file is there with its SHA-256 and line count, every line parses and has
// its file's type, no resource is in the folder twice, and no data file is
// unlisted. It returns the problems found (none: the folder is as committed).
func VerifyFolder(dir string) (files int, resources int64, problems []string, err error) {
	lm, err := readLocalManifest(dir)
	if err != nil {
		return 0, 0, nil, fmt.Errorf("%s: no committed pull: %w", dir, err)
	}
	if Unfinished(dir) {
		problems = append(problems, "an unfinished run: finish it with kiln pull --resume "+dir)
	}
	listed := map[string]bool{}
	seen := newKeySet()
	for _, want := range lm.Files {
		listed[want.File] = true
		got, err := verify(filepath.Join(dir, want.File), File{Type: want.Type}, want.Kind)
		switch {
		case err != nil:
			problems = append(problems, fmt.Sprintf("%s: %v", want.File, err))
			continue
		case got.sha256 != want.SHA256:
			problems = append(problems, fmt.Sprintf("%s: SHA-256 %s, the manifest says %s", want.File, got.sha256, want.SHA256))
		case got.lines != want.Lines:
			problems = append(problems, fmt.Sprintf("%s: %d lines, the manifest says %d", want.File, got.lines, want.Lines))
		}
		files++
		if want.Kind == KindOutput {
			resources += got.lines
			if err := seen.add(got); err != nil {
				problems = append(problems, err.Error())
			}
		}
	}
	paths, _ := dataFiles(dir)
	for _, p := range paths {
		if !listed[filepath.Base(p)] {
			problems = append(problems, filepath.Base(p)+": not in manifest.json")
		}
	}
	return files, resources, problems, nil
}

// stagedManifest is the server's manifest of a verified run, kept in the
// staging folder until the run is committed.
type stagedManifest struct {
	RunID    string          `json:"runId"`
	Manifest json.RawMessage `json:"manifest"`
}

const stagedManifestFile = "server-manifest.json"

func (c *Client) stageManifest(st *State, m *Manifest) error {
	b, err := json.Marshal(stagedManifest{RunID: st.RunID, Manifest: m.raw})
	if err != nil {
		return err
	}
	return writeAtomic(filepath.Join(c.staging(), stagedManifestFile+".tmp"), filepath.Join(c.staging(), stagedManifestFile), b)
}

// StagedManifest returns the manifest of st's run when every file of it was
// verified before an interruption: the resume then needs nothing from the
// server, whose export may be gone.
func (c *Client) StagedManifest(st *State) (*Manifest, bool) {
	b, err := os.ReadFile(filepath.Join(c.staging(), stagedManifestFile))
	if err != nil {
		return nil, false
	}
	var sm stagedManifest
	if json.Unmarshal(b, &sm) != nil || sm.RunID != st.RunID {
		return nil, false
	}
	var m Manifest
	if json.Unmarshal(sm.Manifest, &m) != nil {
		return nil, false
	}
	m.raw = sm.Manifest
	return &m, true
}
