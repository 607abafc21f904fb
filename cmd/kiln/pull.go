package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/term"

	"github.com/kiln-fhir/kiln/pull"
)

type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	*l = append(*l, v)
	return nil
}

// cmdPull is the bulk data client.
func cmdPull(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kiln pull", flag.ContinueOnError)
	server := fs.String("server", "", "FHIR base URL of the server, e.g. https://fhir.example.com/4_0_0")
	group := fs.String("group", "", "export Group/ID (Group level)")
	patientLevel := fs.Bool("patient-level", false, "export Patient/$export (all patients, or --patient)")
	system := fs.Bool("system", false, "export $export (system level; the default)")
	types := fs.String("type", "", "comma-separated resource types (_type)")
	since := fs.String("since", "", "_since (FHIR instant or date)")
	until := fs.String("until", "", "_until")
	elements := fs.String("elements", "", "comma-separated _elements")
	format := fs.String("format", "ndjson", "resource files: ndjson, or parquet (_outputFormat=application/vnd.apache.parquet; not with --since-last)")
	var typeFilters, patients listFlag
	fs.Var(&typeFilters, "type-filter", "a _typeFilter, e.g. 'Observation?category=laboratory' (repeatable)")
	fs.Var(&patients, "patient", "a patient id or Patient/id (repeatable; sent in a POST Parameters body)")
	out := fs.String("out", "./kiln-pull", "folder for the files, the manifest and the resume state")
	parallel := fs.Int("parallel", 4, "parallel downloads")
	lenient := fs.Bool("lenient", false, "send Prefer: handling=lenient")
	post := fs.Bool("post", false, "kick off with POST and every parameter in a Parameters body (implied by --patient)")
	assoc := fs.String("include-associated-data", "", "comma-separated includeAssociatedData codes")
	token := fs.String("token", "", "bearer token")
	tokenFile := fs.String("token-file", "", "file holding the bearer token")
	clientID := fs.String("client-id", "", "SMART Backend Services client id")
	keyFile := fs.String("private-key", "", "client private key: JWK (with kid) or PEM")
	keyID := fs.String("key-id", "", "kid for a PEM key")
	tokenURL := fs.String("token-url", "", "token endpoint (default: discovered from /.well-known/smart-configuration)")
	scope := fs.String("scope", "", "scopes to ask the token endpoint for (default system/*.read, or system/*.rs for a SMART v2-only server; add access/<code>.read to limit the export to tenants, as a Kiln server with --tenancy access-tags requires)")
	resume := fs.String("resume", "", "continue the interrupted pull in this folder")
	sinceLast := fs.String("since-last", "", "pull incrementally into this folder: _since its last transactionTime; deletions and new versions replace older lines")
	cancelOnInterrupt := fs.Bool("cancel-on-interrupt", false, "on Ctrl-C, cancel the export without asking")
	allowPartial := fs.Bool("allow-partial", false, "commit an export whose error files report failed outputs (exits non-zero otherwise, committing nothing)")
	verifyDir := fs.String("verify", "", "check the pull folder DIR against its manifest.json (SHA-256, lines, types, no resource twice) and exit")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: kiln pull --server URL [flags]\n\nRuns a bulk export on any conformant server and downloads, verifies and saves the files.\n\nFlags:")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if *verifyDir != "" {
		return verifyFolder(*verifyDir, stdout)
	}
	tty := false
	if f, ok := stderr.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	progress := func(s string) {
		if tty {
			fmt.Fprintf(stderr, "\r\033[K%s", s)
		} else {
			fmt.Fprintf(stderr, "%s %s\n", time.Now().Format("15:04:05"), s)
		}
	}
	dir := *out
	if *resume != "" {
		dir = *resume
	} else if *sinceLast != "" {
		dir = *sinceLast
	}
	httpc := &http.Client{}
	var err error
	opt := pull.Options{Out: dir, Parallel: *parallel, HTTP: httpc, Progress: progress, AllowPartial: *allowPartial}
	if fp := os.Getenv("KILN_PULL_FAILPOINT"); fp != "" {
		if opt.Failpoint, err = killAt(fp); err != nil {
			return err
		}
	}
	c := pull.New(opt)
	var st *pull.State
	if *resume != "" {
		if st, err = c.Resume(); err != nil {
			return err
		}
		*server = st.Request.Server
	}
	if st != nil && st.Completed {
		fmt.Fprintf(stdout, "the pull in %s is complete; nothing to resume\n", dir)
		return nil
	}
	if *server == "" {
		fs.Usage()
		return errUsage
	}
	switch {
	case *token != "":
		opt.Tokens = pull.StaticToken(*token)
	case *tokenFile != "":
		b, err := os.ReadFile(*tokenFile)
		if err != nil {
			return err
		}
		opt.Tokens = pull.StaticToken(strings.TrimSpace(string(b)))
	case *clientID != "":
		key, kid, err := pull.LoadKey(*keyFile)
		if err != nil {
			return fmt.Errorf("--private-key: %w", err)
		}
		if *keyID != "" {
			kid = *keyID
		}
		tu := *tokenURL
		if tu == "" {
			if tu, err = pull.DiscoverTokenURL(ctx, httpc, *server); err != nil {
				return err
			}
		}
		if *scope == "" {
			*scope = pull.DefaultScope(ctx, httpc, *server)
		}
		opt.Tokens = &pull.BackendServices{ClientID: *clientID, Key: key, KeyID: kid, TokenURL: tu, Scope: *scope, HTTP: httpc}
	}
	c = pull.New(opt)
	if st == nil {
		req := pull.Request{Server: *server, Level: "system", Types: splitList(*types), Since: *since, Until: *until,
			TypeFilters: typeFilters, Elements: splitList(*elements), Patients: patients, Lenient: *lenient,
			Post: *post, IncludeAssociatedData: splitList(*assoc)}
		switch *format {
		case "ndjson":
		case "parquet":
			req.Format = pull.FormatParquet
		default:
			return fmt.Errorf("--format %q: use ndjson or parquet", *format)
		}
		switch {
		case *group != "":
			req.Level, req.GroupID = "group", *group
		case *patientLevel || len(patients) > 0:
			req.Level = "patient"
		}
		_ = system
		if *sinceLast != "" {
			if req.Since, err = pull.PreviousTransactionTime(*sinceLast); err != nil {
				return err
			}
			req.Incremental = true
		}
		if st, err = c.Start(ctx, req); err != nil {
			return err
		}
	}
	res, err := runPull(ctx, c, st)
	if tty {
		fmt.Fprintln(stderr)
	}
	hint := authHint(*token, *tokenFile, *clientID, *keyFile, *keyID, *tokenURL, *scope)
	if res != nil {
		// The server's own words on what it could not export, also when the
		// pull fails for it.
		for _, is := range res.Issues {
			fmt.Fprintf(stderr, "server: %s: %s\n", is.File, is)
		}
	}
	if err != nil {
		var partial *pull.PartialError
		switch {
		case errors.Is(err, context.Canceled):
			return interrupted(c, st, dir, hint, *cancelOnInterrupt, tty, stderr)
		case errors.As(err, &partial):
			return fmt.Errorf("%w; the files that did arrive are verified and kept: commit them with kiln pull --resume %s --allow-partial%s "+
				"(a later --since-last then starts after this export: what failed is not fetched again)", err, dir, hint)
		}
		return err
	}
	if st.Incremental {
		fmt.Fprintf(stdout, "incremental: %d deletions and %d new versions applied (%d older lines removed)\n",
			res.Increment.Deleted, res.Increment.Updated, res.Increment.Removed)
	}
	verdict := "all verified"
	if failed := countFailed(res.Issues); failed > 0 {
		verdict = fmt.Sprintf("all verified, but the server reports %d failed outputs (--allow-partial)", failed)
	}
	fmt.Fprintf(stdout, "pulled %d files into %s: %d resources, %d deletions, %d error lines, %.1f MB; transactionTime %s; %s\n",
		res.Files, dir, res.Resources, res.Deleted, res.Errors, float64(res.Bytes)/1e6, res.Manifest.TransactionTime, verdict)
	return nil
}

func countFailed(issues []pull.Issue) int {
	n := 0
	for _, is := range issues {
		if is.Failed() {
			n++
		}
	}
	return n
}

// verifyFolder is kiln pull --verify DIR.
func verifyFolder(dir string, stdout io.Writer) error {
	files, resources, problems, err := pull.VerifyFolder(dir)
	if err != nil {
		return err
	}
	for _, p := range problems {
		fmt.Fprintln(stdout, p)
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s: %d problems", dir, len(problems))
	}
	fmt.Fprintf(stdout, "%s: %d files, %d resources: every file matches its SHA-256 and line count, no resource twice\n", dir, files, resources)
	return nil
}

// killAt is the crash tests' failpoint (KILN_PULL_FAILPOINT=step:n): the
// process kills itself with SIGKILL the nth time it reaches the step, so
// that nothing — no deferred call, no buffered write — runs after it.
func killAt(spec string) (func(pull.Step), error) {
	name, nth, ok := strings.Cut(spec, ":")
	n, err := strconv.Atoi(nth)
	if !ok || err != nil || n < 1 {
		return nil, fmt.Errorf("KILN_PULL_FAILPOINT %q: want step:n", spec)
	}
	var mu sync.Mutex
	return func(s pull.Step) {
		if string(s) != name {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if n--; n == 0 {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal is on its way
		}
	}, nil
}

func runPull(ctx context.Context, c *pull.Client, st *pull.State) (*pull.Result, error) {
	// A run interrupted after every file was verified finishes from the
	// staging folder, even if the server's export is gone by now.
	m, staged := c.StagedManifest(st)
	if !staged {
		var err error
		if m, err = c.Wait(ctx, st); err != nil {
			return nil, err
		}
	}
	return c.Download(ctx, st, m)
}

// interrupted asks (on a terminal) whether to cancel the export on the server.
// authHint repeats the authentication flags for the resume hint (a token
// itself is not printed).
func authHint(token, tokenFile, clientID, keyFile, keyID, tokenURL, scope string) string {
	var b strings.Builder
	switch {
	case token != "":
		b.WriteString(" --token TOKEN")
	case tokenFile != "":
		fmt.Fprintf(&b, " --token-file %s", tokenFile)
	case clientID != "":
		fmt.Fprintf(&b, " --client-id %s --private-key %s", clientID, keyFile)
		if keyID != "" {
			fmt.Fprintf(&b, " --key-id %s", keyID)
		}
		if tokenURL != "" {
			fmt.Fprintf(&b, " --token-url %s", tokenURL)
		}
		if scope != "" {
			fmt.Fprintf(&b, " --scope '%s'", scope)
		}
	}
	return b.String()
}

func interrupted(c *pull.Client, st *pull.State, dir, auth string, cancel, tty bool, stderr io.Writer) error {
	if !cancel && tty {
		fmt.Fprint(stderr, "\nInterrupted. Cancel the export on the server? [y/N] ")
		line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
		cancel = strings.HasPrefix(strings.ToLower(strings.TrimSpace(line)), "y")
	}
	if cancel {
		ctx, done := context.WithTimeout(context.Background(), 30*time.Second)
		defer done()
		if err := c.Cancel(ctx, st); err != nil {
			return err
		}
		return errors.New("interrupted; export cancelled")
	}
	return fmt.Errorf("interrupted; the export keeps running: continue with kiln pull --resume %s%s", dir, auth)
}
