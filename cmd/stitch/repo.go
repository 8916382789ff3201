package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
)

// repoCmd is what every repository command has: its flag set with the
// repository's directory, its keys directory and --json.
type repoCmd struct {
	fs   *flag.FlagSet
	dir  *string
	keys *string
	json *bool
}

func newRepoCmd(st *stdio, name, args, about string) *repoCmd {
	fs := newFlagSet(st, name, args, about)
	return &repoCmd{
		fs:   fs,
		dir:  fs.String("dir", "stitch-repo", "repository directory"),
		keys: fs.String("keys", "", "signing keys directory (default DIR/keys)"),
		json: fs.Bool("json", false, "print JSON"),
	}
}

// repo parses args (n positional arguments) and opens the repository.
func (c *repoCmd) repo(args []string, n int) (*bundle.Repo, error) {
	if err := parseArgs(c.fs, args, n); err != nil {
		return nil, err
	}
	return &bundle.Repo{Dir: *c.dir, KeysDir: *c.keys}, nil
}

// runRepo: stitch repo init|refresh|status|list|root|export|import.
func runRepo(ctx context.Context, st *stdio, args []string) error {
	return runGroup(ctx, st, "repo", []subcommand{
		{name: "init", summary: "create a repository and its keys", run: runRepoInit},
		{name: "refresh", summary: "re-sign snapshot and timestamp before they expire", run: runRepoRefresh},
		{name: "status", summary: "each role's version and expiry, targets published", run: runRepoStatus},
		{name: "list", summary: "the published targets", run: runRepoList},
		{name: "root", summary: "print the trusted root agents pin", run: runRepoRoot},
		{name: "export", args: "FILE", summary: "write the repository to FILE (- for standard output) for an offline mirror", run: runRepoExport},
		{name: "import", args: "FILE", summary: "update a mirror from an export (- for standard input)", run: runRepoImport},
	}, args)
}

func runRepoInit(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "repo init", "", "Creates a signed (TUF) patch repository and its keys.")
	r, err := c.repo(args, 0)
	if err != nil {
		return err
	}
	if err := r.Init(); err != nil {
		return err
	}
	return report(st, *c.json, map[string]string{"dir": *c.dir, "root": r.MetadataDir() + "/1.root.json"},
		"repository created in %s; give agents %s/1.root.json as their trusted root; keep %s offline (copy it in to rotate keys or renew root)\n",
		*c.dir, r.MetadataDir(), r.KeyPath("root"))
}

func runRepoRefresh(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "repo refresh", "", "Re-signs snapshot and timestamp (run it from cron, well before the timestamp expires).")
	r, err := c.repo(args, 0)
	if err != nil {
		return err
	}
	if err := r.Refresh(); err != nil {
		return err
	}
	s, err := r.Status()
	if err != nil {
		return err
	}
	if !s.ConsistentSnapshot {
		fmt.Fprintf(st.err, "note: %s predates consistent snapshots; run this again with %s present to switch (agents fetching during a publish may be refused until then)\n",
			*c.dir, r.KeyPath("root"))
	}
	return report(st, *c.json, s, "snapshot and timestamp re-signed in %s; timestamp valid until %s\n", *c.dir, s.Roles["timestamp"].Expires.Format(time.RFC3339))
}

func runRepoStatus(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "repo status", "", "Shows each role's version and expiry and the number of published targets.")
	r, err := c.repo(args, 0)
	if err != nil {
		return err
	}
	s, err := r.Status()
	if err != nil {
		return err
	}
	if *c.json {
		return json.NewEncoder(st.out).Encode(s)
	}
	for _, role := range bundle.Roles {
		rs := s.Roles[role]
		fmt.Fprintf(st.out, "%-9s version %-5d expires %s\n", role, rs.Version, rs.Expires.Format(time.RFC3339))
	}
	fmt.Fprintf(st.out, "targets:  %d published; consistent snapshots: %v\n", s.Targets, s.ConsistentSnapshot)
	return nil
}

func runRepoList(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "repo list", "", "Lists the published targets.")
	r, err := c.repo(args, 0)
	if err != nil {
		return err
	}
	names, err := r.Targets()
	if err != nil {
		return err
	}
	if *c.json {
		return json.NewEncoder(st.out).Encode(map[string]any{"targets": names})
	}
	for _, n := range names {
		fmt.Fprintln(st.out, n)
	}
	return nil
}

func runRepoRoot(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "repo root", "", "Prints the repository's trusted root, the file agents pin at enrollment.")
	r, err := c.repo(args, 0)
	if err != nil {
		return err
	}
	b, err := r.TrustedRoot()
	if err != nil {
		return err
	}
	_, err = st.out.Write(b)
	return err
}

func runRepoExport(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "repo export", "FILE", "Writes the repository (metadata and targets) to FILE, - for standard output, for a mirror without a network path to the server.")
	valid := c.fs.Duration("valid", bundle.DefaultExportValid, "how long the export's timestamp stays valid (0: as it is)")
	r, err := c.repo(args, 1)
	if err != nil {
		return err
	}
	if err := bundle.CheckExportValid(*valid); err != nil {
		return usageError{fmt.Errorf("--valid: %w", err)}
	}
	if name := c.fs.Arg(0); name != "-" {
		return r.ExportFile(name, *valid)
	}
	return r.ExportValid(st.out, *valid)
}

func runRepoImport(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "repo import", "FILE", "Updates a mirror from an export, - for standard input; refused unless it verifies against the mirror's root and is newer.")
	r, err := c.repo(args, 1)
	if err != nil {
		return err
	}
	var rd io.Reader = st.in
	if name := c.fs.Arg(0); name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return usageError{err}
		}
		defer f.Close()
		rd = f
	}
	if err := r.Import(rd); err != nil {
		return err
	}
	s, err := r.Status()
	if err != nil {
		return err
	}
	return report(st, *c.json, s, "%s holds timestamp version %d, valid until %s: import a newer export before then\n",
		*c.dir, s.Roles["timestamp"].Version, s.Roles["timestamp"].Expires.Format(time.RFC3339))
}

// runPublish: stitch publish [--dir DIR] [--module KO --manifest JSON | BUNDLE | RECORD.contained.json | OUT/].
func runPublish(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "publish", "OUT/ | BUNDLE | RECORD"+contract.ContainedSuffix,
		"Adds a build to a repository and signs it: its whole output directory (every kernel's module and manifest, every contained record), a bundle, a contained record, or --module with --manifest. With a module-signing key (stitch keys signing init) the modules are signed first.")
	module := c.fs.String("module", "", "livepatch module (.ko) to bundle with --manifest")
	manifest := c.fs.String("manifest", "", "manifest JSON written by stitch build")
	if err := parseFlags(c.fs, args); err != nil {
		return err
	}
	fs, asJSON := c.fs, c.json
	repo := &bundle.Repo{Dir: *c.dir, KeysDir: *c.keys}
	var data []byte
	switch {
	case *module != "" && *manifest != "" && fs.NArg() == 0:
		m, err := contract.ReadManifest(*manifest)
		if err != nil {
			return fmt.Errorf("%s: %w", *manifest, err)
		}
		ko, err := os.ReadFile(*module)
		if err != nil {
			return usageError{err}
		}
		if data, err = bundle.Pack(*m, ko); err != nil {
			return fmt.Errorf("%s: %w", *manifest, err)
		}
	case *module == "" && *manifest == "" && fs.NArg() == 1:
		arg := fs.Arg(0)
		fi, err := os.Stat(arg)
		if err != nil {
			return usageError{err}
		}
		switch {
		case fi.IsDir():
			return publishTree(st, repo, arg, *asJSON)
		case strings.HasSuffix(arg, contract.ContainedSuffix):
			c, err := contract.ReadContained(arg)
			if err != nil {
				return fmt.Errorf("%s: %w", arg, err)
			}
			out, err := repo.PublishAll(nil, []*contract.Contained{c})
			if err != nil {
				return err
			}
			return report(st, *asJSON, map[string]string{"target": out[0].Target, "sha256": out[0].SHA256},
				"published %s (%s contains %s: no patch needed)\n", out[0].Target, c.Kernel.Release, c.Name)
		}
		if data, err = os.ReadFile(arg); err != nil {
			return usageError{err}
		}
	default:
		return usageError{fmt.Errorf("give a build's output directory OUT/ (OUT/RELEASE/NAME.ko with NAME.json, OUT/RELEASE/NAME%s), a bundle file, a contained record, or --module KO and --manifest JSON", contract.ContainedSuffix)}
	}
	// PublishAll, not Publish: with a module-signing key the bundle
	// published is the signed one, whose hash is not data's.
	out, err := repo.PublishAll([][]byte{data}, nil)
	if err != nil {
		return err
	}
	p := out[0]
	res, signed := map[string]string{"target": p.Target, "sha256": p.SHA256}, ""
	if p.Signer != "" {
		res["signer"], signed = p.Signer, " (module signed by "+p.Signer+")"
	}
	return report(st, *asJSON, res, "published %s%s\n", p.Target, signed)
}

// treeItem is one published target of an output tree, with the file it
// came from.
type treeItem struct {
	bundle.Published
	File string `json:"file"` // relative to OUT/: the manifest, or the contained record
}

// publishTree publishes a build's whole output tree in one set of
// signed metadata: every kernel's bundle and every contained record.
func publishTree(st *stdio, repo *bundle.Repo, dir string, asJSON bool) error {
	tree, err := bundle.ReadTree(dir)
	if err != nil {
		return err
	}
	pub, err := repo.PublishAll(tree.Bundles, tree.Contained)
	if err != nil {
		return err
	}
	items := make([]treeItem, len(pub))
	for i, p := range pub {
		items[i] = treeItem{p, tree.Files[i]}
	}
	if asJSON {
		return printJSON(st.out, struct {
			Published []treeItem `json:"published"`
			Skipped   []string   `json:"skipped"`
		}{items, append([]string{}, tree.Skipped...)})
	}
	tw := tabwriter.NewWriter(st.out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "KERNEL\tNAME\tKIND\tTARGET")
	for _, it := range items {
		kind := it.Kind
		if it.Kind == bundle.KindContained {
			kind = "contains the fix"
		}
		target := it.Target
		if !it.New {
			target += " (published before)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", it.Release, it.Name, kind, target)
	}
	tw.Flush()
	for _, it := range items {
		if it.Signer != "" {
			fmt.Fprintf(st.out, "modules signed by module-signing key %s\n", it.Signer)
			break
		}
	}
	if len(tree.Skipped) > 0 {
		fmt.Fprintf(st.err, "skipped (neither a module with its manifest nor a contained record): %s\n", strings.Join(tree.Skipped, " "))
	}
	return nil
}

func runKeys(ctx context.Context, st *stdio, args []string) error {
	return runGroup(ctx, st, "keys", []subcommand{
		{name: "rotate", args: "ROLE", summary: "replace a role's key (root, targets, snapshot, timestamp) and re-sign", run: runKeysRotate},
		{name: "renew-root", summary: "sign a new root version with the offline root key", run: runKeysRenewRoot},
		{name: "signing", args: "SUBCOMMAND", summary: "module-signing keys: init, rotate, use, retire, list", run: runKeysSigning},
	}, args)
}

func runKeysRotate(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "keys rotate", "ROLE", "Replaces ROLE's key (root, targets, snapshot, timestamp) and re-signs the metadata; rotating root or targets needs the offline root key in the keys directory.")
	r, err := c.repo(args, 1)
	if err != nil {
		return err
	}
	role := c.fs.Arg(0)
	if err := r.RotateKey(role); err != nil {
		return err
	}
	return report(st, *c.json, map[string]string{"role": role, "dir": *c.dir}, "%s key rotated in %s; metadata re-signed\n", role, *c.dir)
}

func runKeysRenewRoot(ctx context.Context, st *stdio, args []string) error {
	c := newRepoCmd(st, "keys renew-root", "", "Signs a new root version with the offline root key, before the current one expires.")
	r, err := c.repo(args, 0)
	if err != nil {
		return err
	}
	if err := r.RenewRoot(); err != nil {
		return err
	}
	s, err := r.Status()
	if err != nil {
		return err
	}
	root := s.Roles["root"]
	return report(st, *c.json, map[string]any{"dir": *c.dir, "root_version": root.Version, "root_expires": root.Expires},
		"root version %d signed in %s, valid until %s; agents take it at their next fetch\n", root.Version, *c.dir, root.Expires.Format(time.RFC3339))
}

func report(st *stdio, asJSON bool, v any, format string, a ...any) error {
	if asJSON {
		return json.NewEncoder(st.out).Encode(v)
	}
	_, err := fmt.Fprintf(st.out, format, a...)
	return err
}
