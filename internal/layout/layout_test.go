package layout_test

import (
	"context"
	"errors"
	"testing"

	"github.com/stitchpatch/stitch/internal/kallsyms"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// TestReal61 reads the layout of the test kernel (Debian's 6.1.0-54) and
// checks it against the values Stitch had hard-coded for 6.1 before it
// read them from BTF.
func TestReal61(t *testing.T) {
	l := testlayout.Real(t)
	want := map[string]layout.Section{
		"__bug_table":        {Struct: "bug_entry", Entry: 12, Line: layout.Field{Offset: 8, Size: 2}},
		"__ex_table":         {Struct: "exception_table_entry", Entry: 12},
		"__jump_table":       {Struct: "jump_entry", Entry: 16, Rewrite: 5},
		".altinstructions":   {Struct: "alt_instr", Entry: 12, Len: layout.Field{Offset: 10, Size: 1}},
		".static_call_sites": {Struct: "static_call_site", Entry: 8, Rewrite: 5},
		".parainstructions":  {Struct: "paravirt_patch_site", Entry: 16, Len: layout.Field{Offset: 9, Size: 1}},
		".orc_unwind":        {Struct: "orc_entry", Entry: 6},
		".orc_unwind_ip":     {Entry: 4},
		".retpoline_sites":   {Entry: 4, Rewrite: 6},
		".return_sites":      {Entry: 4, Rewrite: 5},
		".smp_locks":         {Entry: 4, Rewrite: 1},
		".ibt_endbr_seal":    {Entry: 4, Rewrite: 4},
		"__mcount_loc":       {Entry: 8, Rewrite: 5},
	}
	for name, w := range want {
		s, ok := l.Section(name)
		if !ok {
			t.Errorf("6.1 layout lacks %s", name)
			continue
		}
		if s.Struct != w.Struct || s.Entry != w.Entry || s.Site != 0 || s.Rewrite != w.Rewrite || s.Len != w.Len || s.Line != w.Line {
			t.Errorf("%s = %+v, want %+v", name, s, w)
		}
	}
	if err := l.Check([]string{".text", ".parainstructions", "__ex_table"}); err != nil {
		t.Errorf("6.1 refuses its own sections: %v", err)
	}
	// 6.1 runs objtool on each object: its objects have the tables.
	if l.ObjtoolAtLink() || !l.InImage(".return_sites") || !l.InImage(".retpoline_sites") || l.InImage(".ibt_endbr_seal") {
		t.Errorf("6.1 image tables %v: want return and retpoline sites, no ENDBR sealing", l.Image)
	}
}

// TestReal612 checks a 6.12 kernel, where struct alt_instr grew to 14
// bytes and struct paravirt_patch_site is gone (skipped without the test
// kernel testutils.Release612, failed in CI).
func TestReal612(t *testing.T) {
	p := testutils.Profile(t, testutils.Release612)
	vmlinux, err := kallsyms.CachedVmlinux(context.Background(), p.BootImage, kernel.CacheDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	l, err := layout.FromVmlinux(vmlinux)
	if err != nil {
		t.Fatal(err)
	}
	if s, _ := l.Section(".altinstructions"); s.Entry != 14 || s.Len != (layout.Field{Offset: 12, Size: 1}) {
		t.Errorf(".altinstructions = %+v, want 14 bytes with instrlen at 12", s)
	}
	if _, ok := l.Section(".parainstructions"); ok {
		t.Error("6.12 has .parainstructions")
	}
	if err := l.Check([]string{".parainstructions"}); !errors.Is(err, layout.ErrUnknownSection) {
		t.Errorf("6.12 layout takes .parainstructions: %v", err)
	}
	// IBT: objtool runs on vmlinux.o and modules, and seals ENDBRs.
	if !l.ObjtoolAtLink() || !l.InImage(".call_sites") || !l.InImage(".return_sites") {
		t.Errorf("6.12 image tables %v: want .ibt_endbr_seal, .call_sites, .return_sites", l.Image)
	}
	for _, name := range []string{"__bug_table", "__ex_table", "__jump_table", ".static_call_sites"} {
		if _, ok := l.Section(name); !ok {
			t.Errorf("6.12 layout lacks %s", name)
		}
	}
}
