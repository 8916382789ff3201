package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
)

// runRepo: stitch repo init|refresh|list|export|import|root [--dir DIR].
func runRepo(ctx context.Context, st *stdio, args []string) error {
	if len(args) == 0 {
		return usageError{fmt.Errorf("repo: want a subcommand: init, refresh, list, root, export FILE, import FILE")}
	}
	sub := args[0]
	fs := flag.NewFlagSet("repo "+sub, flag.ContinueOnError)
	fs.SetOutput(st.err)
	dir := fs.String("dir", "stitch-repo", "repository directory")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args[1:]); err != nil {
		return usageError{err}
	}
	r := &bundle.Repo{Dir: *dir}
	switch sub {
	case "init":
		if err := r.Init(); err != nil {
			return err
		}
		return report(st, *asJSON, map[string]string{"dir": *dir, "root": r.MetadataDir() + "/1.root.json"},
			"repository created in %s; give agents %s/1.root.json as their trusted root; keep %s/keys offline\n", *dir, r.MetadataDir(), *dir)
	case "refresh":
		if err := r.Refresh(); err != nil {
			return err
		}
		return report(st, *asJSON, map[string]string{"dir": *dir}, "snapshot and timestamp re-signed in %s\n", *dir)
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
			w := st.out
			if name != "-" {
				f, err := os.Create(name)
				if err != nil {
					return err
				}
				defer f.Close()
				w = f
			}
			return r.Export(w)
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
		return report(st, *asJSON, map[string]string{"dir": *dir}, "imported into %s\n", *dir)
	}
	return usageError{fmt.Errorf("repo: unknown subcommand %q (init, refresh, list, root, export, import)", sub)}
}

// runPublish: stitch publish [--dir DIR] [--module KO --manifest JSON | BUNDLE].
func runPublish(ctx context.Context, st *stdio, args []string) error {
	fs := flag.NewFlagSet("publish", flag.ContinueOnError)
	fs.SetOutput(st.err)
	dir := fs.String("dir", "stitch-repo", "repository directory")
	module := fs.String("module", "", "livepatch module (.ko) to bundle with --manifest")
	manifest := fs.String("manifest", "", "manifest JSON written by stitch build")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
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
		var err error
		if data, err = os.ReadFile(fs.Arg(0)); err != nil {
			return usageError{err}
		}
	default:
		return usageError{fmt.Errorf("publish: give a bundle file, or --module KO and --manifest JSON")}
	}
	name, err := (&bundle.Repo{Dir: *dir}).Publish(data)
	if err != nil {
		return err
	}
	return report(st, *asJSON, map[string]string{"target": name, "sha256": bundle.SHA256Hex(data)}, "published %s\n", name)
}

// runKeys: stitch keys rotate ROLE [--dir DIR].
func runKeys(ctx context.Context, st *stdio, args []string) error {
	if len(args) < 2 || args[0] != "rotate" {
		return usageError{fmt.Errorf("keys: usage: stitch keys rotate ROLE [--dir DIR] (ROLE: root, targets, snapshot, timestamp)")}
	}
	role := args[1]
	fs := flag.NewFlagSet("keys rotate", flag.ContinueOnError)
	fs.SetOutput(st.err)
	dir := fs.String("dir", "stitch-repo", "repository directory")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args[2:]); err != nil {
		return usageError{err}
	}
	if err := (&bundle.Repo{Dir: *dir}).RotateKey(role); err != nil {
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
