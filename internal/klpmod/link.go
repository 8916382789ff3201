package klpmod

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/kbuild"
)

// ErrUnresolved means the module refers to a symbol that is neither
// exported by the kernel nor a klp symbol: it could not load.
var ErrUnresolved = errors.New("module refers to symbols the kernel does not export")

// Link builds the livepatch module name from dir (its Kbuild file and
// sources written by the caller) against the headers tree, checks that
// every undefined symbol is exported or a klp symbol, and turns the klp
// symbols into klp relocations (rename: see ConvertKlpSyms). It returns
// the .ko's path and how many relocations each patched object got.
func Link(ctx context.Context, headers, dir, name string, rename map[string]string, progress io.Writer) (string, map[string]int, error) {
	symvers, err := kbuild.ReadSymvers(headers)
	if err != nil {
		return "", nil, err
	}
	if err := importNamespaces(dir, symvers); err != nil {
		return "", nil, err
	}
	// modpost would stop at the klp symbols it cannot find; checkUndefined
	// below is the stricter check.
	ko, err := kbuild.BuildModule(ctx, headers, dir, name, progress, "KBUILD_MODPOST_WARN=1")
	if err != nil {
		return "", nil, err
	}
	if err := checkUndefined(ko, symvers, rename); err != nil {
		return "", nil, err
	}
	moved, err := ConvertKlpSyms(ko, rename)
	if err != nil {
		return "", nil, err
	}
	return ko, moved, nil
}

func checkUndefined(ko string, symvers kbuild.Symvers, rename map[string]string) error {
	f, err := elf.Open(ko)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrBadModule, err)
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrBadModule, ko, err)
	}
	var missing []string
	for _, s := range syms {
		if s.Section != elf.SHN_UNDEF || s.Name == "" || strings.HasPrefix(s.Name, KlpSymPrefix) {
			continue
		}
		if _, ok := rename[s.Name]; ok {
			continue
		}
		if _, ok := symvers[s.Name]; !ok {
			missing = append(missing, s.Name)
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return fmt.Errorf("%s: %w: %s", ko, ErrUnresolved, strings.Join(missing, ", "))
	}
	return nil
}

// importNamespaces declares in the registration (stitch_hook.c) the
// symbol namespaces of the exported symbols the diff objects use: a
// module that uses a namespaced export (EXPORT_SYMBOL_NS, common in
// 6.12's drivers) without importing its namespace is refused by modpost.
// MODULE_INFO(import_ns, "NS") is what MODULE_IMPORT_NS expands to in
// every series, whether it takes an identifier (6.1, 6.12) or a string.
func importNamespaces(dir string, symvers kbuild.Symvers) error {
	objs, err := filepath.Glob(filepath.Join(dir, "stitch_diff_*.o_shipped"))
	if err != nil {
		return err
	}
	// The hooks file's object, compiled already (CompileHooks).
	if hooks := filepath.Join(dir, strings.TrimSuffix(HooksSource, ".c")+".o"); fileExists(hooks) {
		objs = append(objs, hooks)
	}
	seen := map[string]bool{}
	var ns []string
	for _, path := range objs {
		f, err := elf.Open(path)
		if err != nil {
			return fmt.Errorf("%w: %s: %v", ErrBadModule, path, err)
		}
		syms, err := f.Symbols()
		f.Close()
		if err != nil {
			return fmt.Errorf("%w: %s: %v", ErrBadModule, path, err)
		}
		for _, s := range syms {
			if n := symvers[s.Name].Namespace; s.Section == elf.SHN_UNDEF && n != "" && !seen[n] {
				seen[n] = true
				ns = append(ns, n)
			}
		}
	}
	if len(ns) == 0 {
		return nil
	}
	sort.Strings(ns)
	hook, err := os.OpenFile(filepath.Join(dir, "stitch_hook.c"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	for _, n := range ns {
		fmt.Fprintf(hook, "MODULE_INFO(import_ns, %q);\n", n)
	}
	return hook.Close()
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
