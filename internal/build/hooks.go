package build

import (
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/klpmod"
	"github.com/stitchpatch/stitch/internal/objdiff"
)

// Hooks is the fix author's hooks file (stitch build --hooks): C compiled
// into the livepatch module, with stitch/hooks.h (docs/fix-author.md).
type Hooks struct {
	Name   string // file name, without its directory
	Source []byte
	Hash   string // SHA-256, lower-case hex
}

// LoadHooks reads a hooks file.
func LoadHooks(path string) (*Hooks, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("hooks file: %w", err)
	}
	if !strings.HasSuffix(path, ".c") {
		return nil, fmt.Errorf("%w: hooks file %s: want a C file (NAME.c)", ErrBadFix, path)
	}
	sum := sha256.Sum256(b)
	return &Hooks{Name: filepath.Base(path), Source: b, Hash: hex.EncodeToString(sum[:])}, nil
}

// callbackKey is one klp callback slot: an object's pre-patch, say.
type callbackKey struct{ object, kind string }

type callbackDef struct {
	fn    string // symbol the registration names
	where string // for messages: the function and its file
}

// callbacks are the klp callbacks of the patch, from the hooks file and
// from the fix's own code (kpatch's macros).
type callbacks map[callbackKey]callbackDef

// add records a callback; a klp_object has one of each kind.
func (c callbacks) add(object, kind, fn, where string) error {
	k := callbackKey{object, kind}
	if old, ok := c[k]; ok {
		return fmt.Errorf("%w: two %s callbacks for %s (%s, and %s): a klp_object has one; call one from the other", ErrUnpatchable, kind, object, old.where, where)
	}
	c[k] = callbackDef{fn, where}
	return nil
}

// sortedKeys orders the callbacks by object, then as the kernel runs them.
func sortedKeys(c callbacks) []callbackKey {
	keys := make([]callbackKey, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].object != keys[j].object {
			return keys[i].object < keys[j].object
		}
		return slices.Index(klpmod.CallbackKinds, keys[i].kind) < slices.Index(klpmod.CallbackKinds, keys[j].kind)
	})
	return keys
}

// checkObject checks that a callback's object is vmlinux or one of the
// target's modules: a callback for a misspelt module would never run.
func checkObject(t Target, object string) error {
	if object == "vmlinux" || t.Defines(object, "__this_module") {
		return nil
	}
	return fmt.Errorf("%w: no module %s in %s (name vmlinux, or a module as lsmod shows it, with underscores)", ErrNoSymbol, object, t.Release())
}

// resolveHooks decides how the module reaches each symbol the hooks file
// uses and does not define, by the rules of the changed code: an export
// of vmlinux through the module loader; anything else through a klp
// relocation to the one object that has it (vmlinux, or a module the
// patch has a klp object for), whose name must be unique there. A symbol
// the target does not have, or has more than once, is refused: it would
// make the patch fail to load, or reach the wrong variable. It returns
// the undefined symbols' klp names, for klpmod.Link.
func resolveHooks(t Target, h *klpmod.CompiledHooks, objects []string) (map[string]string, error) {
	rename := map[string]string{}
	var problems []string
	candidates := []string{"vmlinux"}
	for _, o := range objects {
		if !slices.Contains(candidates, o) {
			candidates = append(candidates, o)
		}
	}
	for _, name := range h.Undefined {
		if name == "__this_module" { // the module's own, made by modpost
			continue
		}
		if strings.HasPrefix(name, klpmod.NewPrefix) { // STITCH_NEW: the patch's own copy
			if fn := strings.TrimPrefix(name, klpmod.NewPrefix); !slices.Contains(h.Redirects, fn) {
				problems = append(problems, fmt.Sprintf("the hooks use STITCH_NEW(%s) without STITCH_REDIRECTS(%s): the patch carries a copy of %s only for hooks that re-point the pointers to it", fn, fn, fn))
			}
			continue
		}
		if exp, ok := t.Exported(name); ok && exp == "vmlinux" {
			continue
		}
		var where []string
		for _, o := range candidates {
			if t.Defines(o, name) {
				where = append(where, o)
			}
		}
		switch len(where) {
		case 0:
			problems = append(problems, fmt.Sprintf("the hooks use %s, which %s does not have (looked in %s)", name, t.Release(), strings.Join(candidates, ", ")))
			continue
		case 1:
		default:
			problems = append(problems, fmt.Sprintf("the hooks use %s, which both %s define: cannot tell which is meant", name, strings.Join(where, " and ")))
			continue
		}
		pos, err := t.Sympos(where[0], name, nil, nil)
		if err != nil {
			problems = append(problems, fmt.Sprintf("the hooks use %s: %s", name, strings.TrimPrefix(err.Error(), ErrNoSymbol.Error()+": ")))
			continue
		}
		rename[name] = klpmod.KlpSymName(where[0], name, pos)
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("%w: %s", ErrNoSymbol, strings.Join(problems, "; "))
	}
	return rename, nil
}

// updatable checks that the hooks may take over a changed initialiser
// (STITCH_UPDATES_DATA): a writable variable whose size the fix keeps, so
// that updating it in place gives the running kernel what the fix means.
func updatable(c compiled, p objdiff.Problem) error {
	if p.Kind != objdiff.KindData {
		return fmt.Errorf("the change is not to a variable's initial value (%s: %s)", p.Kind, p.Reason)
	}
	if c.Pre == nil || c.Post == nil {
		return fmt.Errorf("the objects are not at hand")
	}
	pre, err := elfobj.Parse(c.Pre)
	if err != nil {
		return err
	}
	post, err := elfobj.Parse(c.Post)
	if err != nil {
		return err
	}
	a, b := pre.Symbol(p.Symbol), post.Symbol(p.Symbol)
	switch {
	case a == nil || b == nil || !a.Defined() || !b.Defined():
		return fmt.Errorf("it is not a variable of both the pre-fix and the post-fix object")
	case a.Size != b.Size:
		return fmt.Errorf("its size changes from %d to %d bytes, and running code keeps the old layout", a.Size, b.Size)
	case b.Section.Flags&elf.SHF_WRITE == 0:
		return fmt.Errorf("it is read-only data (%s), which the kernel cannot update in place", b.Section.Name)
	}
	return nil
}
