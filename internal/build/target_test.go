package build

import (
	"context"
	"testing"

	"github.com/stitchpatch/stitch/internal/kallsyms"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/testutils"
)

func openTestKernel(t *testing.T) *Kernel {
	t.Helper()
	k, err := OpenKernel(context.Background(), testutils.DefaultProfile(t), kernel.CacheDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Duplicated local names in the real kernel: each occurrence is found
// from a unique symbol of its own file just before it.
func TestSymposFromNeighbours(t *testing.T) {
	k := openTestKernel(t)
	syms := k.image.Table.Symbols()
	checked := 0
	for _, name := range []string{"jhash", "cpumask_weight", "type_show"} {
		occ := k.image.Table.Lookup(kallsyms.Vmlinux, name)
		if len(occ) < 2 {
			t.Fatalf("%s is not duplicated in vmlinux (%d)", name, len(occ))
		}
		for _, o := range occ {
			// The nearest preceding text symbol whose name is unique.
			var anchor string
			for i := range syms {
				s := syms[i]
				if s.Addr < o.Addr && s.IsText() && s.Addr > o.Addr-0x2000 && len(k.image.Table.Lookup(kallsyms.Vmlinux, s.Name)) == 1 {
					anchor = s.Name
				}
			}
			if anchor == "" {
				continue
			}
			got, err := k.Sympos(kallsyms.Vmlinux, name, []string{anchor}, nil)
			if err != nil || got != o.Sympos {
				t.Errorf("Sympos(%s near %s) = %d, %v; want %d", name, anchor, got, err, o.Sympos)
			}
			checked++
		}
	}
	if checked < 10 {
		t.Errorf("only %d occurrences had a unique neighbour", checked)
	}
	if pos, err := k.Sympos(kallsyms.Vmlinux, "cmdline_proc_show", nil, nil); err != nil || pos != 0 {
		t.Errorf("unique name: sympos %d, %v; want 0", pos, err)
	}
	if _, err := k.Sympos(kallsyms.Vmlinux, "jhash", nil, nil); err == nil {
		t.Error("a duplicated name with no neighbours was resolved")
	}
}

// The target kernel's special-section layout comes from its own image.
func TestKernelLayout(t *testing.T) {
	k := openTestKernel(t)
	if s, ok := k.Layout().Section(".altinstructions"); !ok || s.Struct != "alt_instr" || s.Entry == 0 {
		t.Errorf("layout of the test kernel: .altinstructions = %+v, %v", s, ok)
	}
}

// Exported names the exporting module as a klp object, not by the build
// path Module.symvers gives: the resolver compares it with the patched
// object, so that the patch reaches a module's own exports through klp
// relocations and does not depend on (nor force-load) the module it
// patches.
func TestExportedByObjectName(t *testing.T) {
	k := openTestKernel(t)
	for name, want := range map[string]string{
		"nf_conntrack_find_get": "nf_conntrack",   // net/netfilter/nf_conntrack
		"_printk":               "vmlinux",        // vmlinux
		"twofish_enc_blk":       "twofish_x86_64", // arch/x86/crypto/twofish-x86_64
	} {
		if got, ok := k.Exported(name); !ok || got != want {
			t.Errorf("Exported(%s) = %q, %v; want %q", name, got, ok, want)
		}
	}
	if got, ok := k.Exported("no_such_symbol_here"); ok {
		t.Errorf("Exported(no_such_symbol_here) = %q, true", got)
	}
	ref, err := resolver(k, compiled{Object: "nf_conntrack"}, nil, nil)("nf_conntrack_find_get", false)
	if err != nil || ref.Exported || ref.Object != "nf_conntrack" {
		t.Errorf("nf_conntrack's own export, from a patch to nf_conntrack: %+v, %v; want a klp relocation to nf_conntrack", ref, err)
	}
	if ref, err := resolver(k, compiled{Object: "openvswitch"}, nil, nil)("nf_conntrack_find_get", false); err != nil || !ref.Exported {
		t.Errorf("nf_conntrack's export, from a patch to openvswitch: %+v, %v; want it linked by name", ref, err)
	}
}
