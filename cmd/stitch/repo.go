package main

import (
	"context"
	"encoding/json"
	"errors"
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

// runRepo: stitch repo init|refresh|status|list|root|export|import [--dir DIR] [--keys DIR].
func runRepo(ctx context.Context, st *stdio, args []string) error {
	const subs = "init, refresh, status, list, root, export FILE, import FILE"
	if len(args) == 0 {
		return usageError{fmt.Errorf("repo: want a subcommand: %s", subs)}
	}
	sub := args[0]
	fs := flag.NewFlagSet("repo "+sub, flag.ContinueOnError)
	fs.SetOutput(st.err)
	dir := fs.String("dir", "stitch-repo", "repository directory")
	keys := fs.String("keys", "", "signing keys directory (default DIR/keys)")
	asJSON := fs.Bool("json", false, "print JSON")
	valid := fs.Duration("valid", bundle.DefaultExportValid, "export: how long the export's timestamp stays valid (0: as it is)")
	if err := fs.Parse(args[1:]); err != nil {
		return usageError{err}
	}
	r := &bundle.Repo{Dir: *dir, KeysDir: *keys}
	switch sub {
	case "init":
		if err := r.Init(); err != nil {
			return err
		}
		return report(st, *asJSON, map[string]string{"dir": *dir, "root": r.MetadataDir() + "/1.root.json"},
			"repository created in %s; give agents %s/1.root.json as their trusted root; keep %s offline (copy it in to rotate keys or renew root)\n",
			*dir, r.MetadataDir(), r.KeyPath("root"))
	case "refresh":
		if err := r.Refresh(); err != nil {
			return err
		}
		s, err := r.Status()
		if err != nil {
			return err
		}
		if !s.ConsistentSnapshot {
			fmt.Fprintf(st.err, "note: %s predates consistent snapshots; run this again with %s present to switch (agents fetching during a publish may be refused until then)\n",
				*dir, r.KeyPath("root"))
		}
		return report(st, *asJSON, s, "snapshot and timestamp re-signed in %s; timestamp valid until %s\n", *dir, s.Roles["timestamp"].Expires.Format(time.RFC3339))
	case "status":
		s, err := r.Status()
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(st.out).Encode(s)
		}
		for _, role := range bundle.Roles {
			rs := s.Roles[role]
			fmt.Fprintf(st.out, "%-9s version %-5d expires %s\n", role, rs.Version, rs.Expires.Format(time.RFC3339))
		}
		fmt.Fprintf(st.out, "targets:  %d published; consistent snapshots: %v\n", s.Targets, s.ConsistentSnapshot)
		return nil
	case "list":
		names, err := r.Targets()
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(st.out).Encode(map[string]any{"targets": names})
		}
		for _, n := range names {
			fmt.Fprintln(st.out, n)
		}
		return nil
	case "root":
		b, err := r.TrustedRoot()
		if err != nil {
			return err
		}
		_, err = st.out.Write(b)
		return err
	case "export", "import":
		if fs.NArg() != 1 {
			return usageError{fmt.Errorf("repo %s: want one FILE (- for standard %s)", sub, map[string]string{"export": "output", "import": "input"}[sub])}
		}
		name := fs.Arg(0)
		if sub == "export" {
			if err := bundle.CheckExportValid(*valid); err != nil {
				return usageError{fmt.Errorf("repo export: --valid: %w", err)}
			}
			if name == "-" {
				return r.ExportValid(st.out, *valid)
			}
			return r.ExportFile(name, *valid)
		}
		var rd io.Reader = os.Stdin
		if name != "-" {
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
		exp := s.Roles["timestamp"].Expires
		return report(st, *asJSON, s, "%s holds timestamp version %d, valid until %s: import a newer export before then\n",
			*dir, s.Roles["timestamp"].Version, exp.Format(time.RFC3339))
	}
	return usageError{fmt.Errorf("repo: unknown subcommand %q (%s)", sub, subs)}
}

// runPublish: stitch publish [--dir DIR] [--module KO --manifest JSON | BUNDLE | RECORD.contained.json | OUT/].
func runPublish(ctx context.Context, st *stdio, args []string) error {
	fs := flag.NewFlagSet("publish", flag.ContinueOnError)
	fs.SetOutput(st.err)
	dir := fs.String("dir", "stitch-repo", "repository directory")
	keys := fs.String("keys", "", "signing keys directory (default DIR/keys)")
	module := fs.String("module", "", "livepatch module (.ko) to bundle with --manifest")
	manifest := fs.String("manifest", "", "manifest JSON written by stitch build")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	repo := &bundle.Repo{Dir: *dir, KeysDir: *keys}
	var data []byte
	switch {
	case *module != "" && *manifest != "" && fs.NArg() == 0:
		m, err := contract.ReadManifest(*manifest)
		if err != nil {
			return fmt.Errorf("publish %s: %w", *manifest, err)
		}
		ko, err := os.ReadFile(*module)
		if err != nil {
			return usageError{err}
		}
		if data, err = bundle.Pack(*m, ko); err != nil {
			return fmt.Errorf("publish %s: %w", *manifest, err)
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
				return fmt.Errorf("publish %s: %w", arg, err)
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
		return usageError{fmt.Errorf("publish: give a build's output directory OUT/ (OUT/RELEASE/NAME.ko with NAME.json, OUT/RELEASE/NAME%s), a bundle file, a contained record, or --module KO and --manifest JSON", contract.ContainedSuffix)}
	}
	name, err := repo.Publish(data)
	if err != nil {
		return err
	}
	return report(st, *asJSON, map[string]string{"target": name, "sha256": bundle.SHA256Hex(data)}, "published %s\n", name)
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
	if len(tree.Skipped) > 0 {
		fmt.Fprintf(st.err, "skipped (neither a module with its manifest nor a contained record): %s\n", strings.Join(tree.Skipped, " "))
	}
	return nil
}

// runKeys: stitch keys rotate ROLE | renew-root [--dir DIR] [--keys DIR].
func runKeys(ctx context.Context, st *stdio, args []string) error {
	const usage = "keys: usage: stitch keys rotate ROLE [--dir DIR] [--keys DIR] (ROLE: root, targets, snapshot, timestamp), or stitch keys renew-root [--dir DIR] [--keys DIR]"
	if len(args) == 0 || (args[0] == "rotate" && len(args) < 2) || (args[0] != "rotate" && args[0] != "renew-root") {
		return usageError{errors.New(usage)}
	}
	sub, rest := args[0], args[1:]
	role := ""
	if sub == "rotate" {
		role, rest = args[1], args[2:]
	}
	fs := flag.NewFlagSet("keys "+sub, flag.ContinueOnError)
	fs.SetOutput(st.err)
	dir := fs.String("dir", "stitch-repo", "repository directory")
	keys := fs.String("keys", "", "signing keys directory (default DIR/keys)")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(rest); err != nil {
		return usageError{err}
	}
	if fs.NArg() != 0 {
		return usageError{errors.New(usage)}
	}
	r := &bundle.Repo{Dir: *dir, KeysDir: *keys}
	if sub == "renew-root" {
		if err := r.RenewRoot(); err != nil {
			return err
		}
		s, err := r.Status()
		if err != nil {
			return err
		}
		root := s.Roles["root"]
		return report(st, *asJSON, map[string]any{"dir": *dir, "root_version": root.Version, "root_expires": root.Expires},
			"root version %d signed in %s, valid until %s; agents take it at their next fetch\n", root.Version, *dir, root.Expires.Format(time.RFC3339))
	}
	if err := r.RotateKey(role); err != nil {
		return err
	}
	return report(st, *asJSON, map[string]string{"role": role, "dir": *dir}, "%s key rotated in %s; metadata re-signed\n", role, *dir)
}

func report(st *stdio, asJSON bool, v any, format string, a ...any) error {
	if asJSON {
		return json.NewEncoder(st.out).Encode(v)
	}
	_, err := fmt.Fprintf(st.out, format, a...)
	return err
}
