package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/stitchpatch/stitch/internal/kallsyms"
	"github.com/stitchpatch/stitch/internal/kernel"
)

// runKallsyms prints a kernel's symbols as Stitch finds them without debug
// info: decoded from the boot image, or from a kallsyms listing or a .ko.
func runKallsyms(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "kallsyms", "[NAME...]", "Prints the symbols of a kernel image (its kallsyms tables, decoded), of a /proc/kallsyms listing or of a module; with NAMEs, every occurrence of each with its sympos. With --find, names the object (vmlinux or a module) that defines the NAMEd functions.")
	image := fs.String("image", kernel.Default, "kernel boot image (bzImage), or a release ready in the cache or installed")
	proc := fs.String("proc", "", "read this /proc/kallsyms listing instead of the image")
	module := fs.String("module", "", "read this module .ko instead of the image")
	find := fs.Bool("find", false, "tell which object defines the NAMEd functions")
	modules := fs.String("modules", "", "modules directory for --find (default /lib/modules/<release of the image>)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	names := fs.Args()

	var tb *kallsyms.Table
	switch {
	case *module != "":
		m, err := kallsyms.ReadModule(*module)
		if err != nil {
			return err
		}
		tb = m.Table
	case *proc != "":
		f, err := os.Open(*proc)
		if err != nil {
			return usageError{err}
		}
		defer f.Close()
		if tb, err = kallsyms.ParseProc(f); err != nil {
			return fmt.Errorf("%s: %w", *proc, err)
		}
	default:
		img, p, err := bootImage(ctx, kernel.CacheDir(), *image)
		if err != nil {
			return err
		}
		if p != nil && *modules == "" {
			*modules = p.Modules
		}
		*image = img
		im, err := kallsyms.OpenImage(ctx, img, kernel.CacheDir(), st.log)
		if err != nil {
			return err
		}
		tb = im.Table
	}

	if *find {
		if len(names) == 0 {
			return usageError{fmt.Errorf("--find needs function names")}
		}
		dir := *modules
		if dir == "" {
			rel := strings.TrimPrefix(filepath.Base(*image), "vmlinuz-")
			dir = filepath.Join("/lib/modules", rel)
		}
		loc, err := kallsyms.FindObject(ctx, tb, kallsyms.NewModules(dir, st.log), names)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(st.out, loc)
		}
		fmt.Fprintf(st.out, "%s %s\n", loc.Object, loc.Path)
		if len(loc.Missing) > 0 {
			fmt.Fprintf(st.out, "not found there: %s\n", strings.Join(loc.Missing, " "))
		}
		return nil
	}

	syms := tb.Symbols()
	if len(names) > 0 {
		syms = nil
		for _, n := range names {
			found := false
			for _, obj := range tb.Objects() {
				occ := tb.Lookup(obj, n)
				found = found || len(occ) > 0
				syms = append(syms, occ...)
			}
			if !found {
				return fmt.Errorf("%w: %s", kallsyms.ErrNotFound, n)
			}
		}
	}
	if *asJSON {
		return printJSON(st.out, syms)
	}
	for _, s := range syms {
		fmt.Fprintf(st.out, "%s %s sympos=%d size=%d\n", s.Line(), s.Object, s.Sympos, s.Size)
	}
	return nil
}
