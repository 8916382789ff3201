package klpmod

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

func compile(t *testing.T, src string) []byte { return testutils.CompileObject(t, src) }

// exportedOnly is a resolver for a kernel that exports the names given.
func exportedOnly(names ...string) Resolver {
	return func(name string, local bool) (Ref, error) {
		if !local && slices.Contains(names, name) {
			return Ref{Exported: true}, nil
		}
		return Ref{Object: "vmlinux"}, nil
	}
}

func TestWriteObject(t *testing.T) {
	post := compile(t, "testdata/writer/fix.c")
	in := &ObjectInput{
		Object:  "vmlinux",
		Layout:  testlayout.Real(t),
		Post:    post,
		Funcs:   []Func{{Name: "changed"}},
		Resolve: exportedOnly("exported_thing", "printf", "__fentry__"),
	}
	out, alias, err := WriteObject(in, "__stitch_fn_0_")
	if err != nil {
		t.Fatal(err)
	}
	if alias["changed"] != "__stitch_fn_0_0" {
		t.Errorf("aliases = %v", alias)
	}
	f, err := elf.NewFile(bytes.NewReader(out))
	if err != nil {
		t.Fatalf("output is not ELF: %v", err)
	}
	var secs []string
	for _, s := range f.Sections {
		secs = append(secs, s.Name)
	}
	for _, want := range []string{".text.changed", "__mcount_loc"} {
		if !slices.Contains(secs, want) {
			t.Errorf("output lacks %s; has %v", want, secs)
		}
	}
	for _, unwanted := range []string{".text.helper", ".init.text", ".text.uses_init", ".bss.counter"} {
		if slices.Contains(secs, unwanted) {
			t.Errorf("output carries %s, which the fix did not change", unwanted)
		}
	}
	syms, _ := f.Symbols()
	undef := map[string]bool{}
	defined := map[string]elf.Symbol{}
	for _, s := range syms {
		if s.Section == elf.SHN_UNDEF {
			undef[s.Name] = true
		} else if s.Name != "" {
			defined[s.Name] = s
		}
	}
	for name := range undef {
		if strings.Contains(name, "__func__") {
			t.Errorf("constant %s referenced, not carried", name)
		}
	}
	for _, want := range []string{
		".klp.sym.vmlinux.counter,0", ".klp.sym.vmlinux.helper,0", ".klp.sym.vmlinux.hidden_global,0",
		"exported_thing", "__fentry__",
	} {
		if !undef[want] {
			t.Errorf("no undefined symbol %s; have %v", want, undef)
		}
	}
	if a, ok := defined["__stitch_fn_0_0"]; !ok || elf.ST_BIND(a.Info) != elf.STB_GLOBAL || f.Sections[a.Section].Name != ".text.changed" {
		t.Errorf("alias symbol = %+v", a)
	}
	if c, ok := defined["changed"]; !ok || elf.ST_BIND(c.Info) != elf.STB_LOCAL {
		t.Errorf("carried function must be local: %+v", c)
	}
	// Every relocation of the carried code must survive, pointing at the
	// same place: same count as in the post object.
	postF, _ := elf.NewFile(bytes.NewReader(post))
	if n, m := relaCount(postF, ".rela.text.changed"), relaCount(f, ".rela.text.changed"); n != m || n == 0 {
		t.Errorf("relocations of changed: %d in the post object, %d in the output", n, m)
	}
}

func relaCount(f *elf.File, name string) int {
	s := f.Section(name)
	if s == nil {
		return 0
	}
	return int(s.Size / 24)
}

func TestWriteObjectRefusesInitReference(t *testing.T) {
	in := &ObjectInput{
		Object:  "vmlinux",
		Layout:  testlayout.Real(t),
		Post:    compile(t, "testdata/writer/fix.c"),
		Funcs:   []Func{{Name: "uses_init"}},
		Resolve: exportedOnly("__fentry__"),
	}
	_, _, err := WriteObject(in, "__stitch_fn_0_")
	if !errors.Is(err, ErrUnpatchable) {
		t.Fatalf("WriteObject = %v, want ErrUnpatchable", err)
	}
	t.Log(err)
}

func TestWriteObjectUnknownFunction(t *testing.T) {
	in := &ObjectInput{Object: "vmlinux", Layout: testlayout.Real(t), Post: compile(t, "testdata/writer/fix.c"), Funcs: []Func{{Name: "nope"}}, Resolve: exportedOnly()}
	if _, _, err := WriteObject(in, "x"); !errors.Is(err, ErrUnpatchable) {
		t.Errorf("WriteObject(nope) = %v", err)
	}
	in.Post = []byte("garbage")
	if _, _, err := WriteObject(in, "x"); err == nil {
		t.Error("WriteObject accepted garbage")
	}
}

// A tracepoint's jump label whose key is not exported is dropped (the
// site stays a NOP: no tracing in the patched function); any other
// unexported key's is rewritten into a test of the key.
func TestWriteObjectJumpLabels(t *testing.T) {
	post := compile(t, "testdata/writer/jump.c")
	in := &ObjectInput{Object: "vmlinux", Layout: testlayout.Real(t), Post: post, Funcs: []Func{{Name: "traced"}}, Resolve: exportedOnly("__fentry__")}
	out, _, err := WriteObject(in, "__stitch_fn_0_")
	if err != nil {
		t.Fatalf("tracepoint site: %v", err)
	}
	f, err := elf.NewFile(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	if s := f.Section("__jump_table"); s != nil && s.Size > 0 {
		t.Errorf("the tracepoint's jump table entry was carried (%d bytes)", s.Size)
	}
	in.Funcs = []Func{{Name: "featured"}}
	if w, err := Write(in, "__stitch_fn_0_"); err != nil || len(w.Branches) != 1 || w.Branches[0].Key != "feature_key" {
		t.Errorf("jump label on an unexported key: %+v, %v; want it rewritten into a test of feature_key (TestWriteObjectStubsJumpLabels)", w, err)
	}
	in.Resolve = exportedOnly("__fentry__", "feature_key")
	out, _, err = WriteObject(in, "__stitch_fn_0_")
	if err != nil {
		t.Fatalf("jump label on an exported key: %v", err)
	}
	f, _ = elf.NewFile(bytes.NewReader(out))
	if s := f.Section("__jump_table"); s == nil || s.Size != 16 {
		t.Errorf("the exported key's jump table entry was not carried")
	}
}

// A static call site whose key is not exported is left out: the call goes
// through the trampoline, which the kernel keeps current.
func TestWriteObjectStaticCall(t *testing.T) {
	post := compile(t, "testdata/writer/jump.c")
	for _, exported := range []bool{false, true} {
		names := []string{"__fentry__"}
		if exported {
			names = append(names, "__SCK__stitch_call", "__SCT__stitch_call")
		}
		in := &ObjectInput{Object: "vmlinux", Layout: testlayout.Real(t), Post: post, Funcs: []Func{{Name: "called"}}, Resolve: exportedOnly(names...)}
		out, _, err := WriteObject(in, "__stitch_fn_0_")
		if err != nil {
			t.Fatalf("exported=%v: %v", exported, err)
		}
		f, _ := elf.NewFile(bytes.NewReader(out))
		var size uint64
		if s := f.Section(".static_call_sites"); s != nil {
			size = s.Size
		}
		if want := map[bool]uint64{false: 0, true: 8}[exported]; size != want {
			t.Errorf("exported=%v: .static_call_sites has %d bytes, want %d", exported, size, want)
		}
	}
}

// Where objtool registers static call sites only when the module is
// linked (6.12), the diff object names the key of a call to an exported
// static call, so that objtool keys the site by it and not by the
// trampoline, which the module loader refuses for such a static call. A
// key kept private is not named (the trampoline is then the key), and a
// trampoline not exported is reached through a klp relocation, no site.
func TestWriteObjectNamesStaticCallKey(t *testing.T) {
	post := compile(t, "testdata/writer/jump.c")
	for _, c := range []struct {
		exported []string
		want     []string // undefined symbols, of those named __SC*
	}{
		{[]string{"__SCK__stitch_call", "__SCT__stitch_call"}, []string{"__SCK__stitch_call", "__SCT__stitch_call"}},
		{[]string{"__SCT__stitch_call"}, []string{"__SCT__stitch_call"}},
		{nil, []string{".klp.sym.vmlinux.__SCT__stitch_call,0"}},
	} {
		in := &ObjectInput{Object: "vmlinux", Layout: testlayout.Real(t), Post: post, Funcs: []Func{{Name: "called_late"}},
			Resolve: exportedOnly(append(c.exported, "__fentry__")...)}
		out, _, err := WriteObject(in, "__stitch_fn_0_")
		if err != nil {
			t.Fatalf("exported %v: %v", c.exported, err)
		}
		f, err := elf.NewFile(bytes.NewReader(out))
		if err != nil {
			t.Fatal(err)
		}
		syms, _ := f.Symbols()
		var got []string
		for _, s := range syms {
			if s.Section == elf.SHN_UNDEF && strings.Contains(s.Name, "__SC") {
				got = append(got, s.Name)
			}
		}
		slices.Sort(got)
		if !slices.Equal(got, c.want) {
			t.Errorf("exported %v: undefined static call symbols %q, want %q", c.exported, got, c.want)
		}
	}
}

// A WARN_ONCE flag is carried as a fresh copy under either kernel's
// section name, never looked up (a file has several of one name).
func TestWriteObjectCarriesOnceFlags(t *testing.T) {
	post := compile(t, "testdata/writer/once.c")
	notFound := func(name string, local bool) (Ref, error) {
		if name == "printk" || name == "__fentry__" {
			return Ref{Exported: true}, nil
		}
		return Ref{}, fmt.Errorf("%s: looked up", name)
	}
	for _, fn := range []string{"old_once", "new_once"} {
		in := &ObjectInput{Object: "vmlinux", Layout: testlayout.Real(t), Post: post, Funcs: []Func{{Name: fn}}, Resolve: notFound}
		out, _, err := WriteObject(in, "__stitch_fn_0_")
		if err != nil {
			t.Fatalf("%s: %v", fn, err)
		}
		f, err := elf.NewFile(bytes.NewReader(out))
		if err != nil {
			t.Fatal(err)
		}
		if f.Section(".data.once") == nil && f.Section(".data..once") == nil {
			t.Errorf("%s: the flag's section was not carried", fn)
		}
	}
}

// A static function the target kernel has no copy of (inlined everywhere
// in its build) is carried along with the code that calls it.
func TestWriteObjectCarriesMissingHelper(t *testing.T) {
	post := compile(t, "testdata/writer/fix.c")
	base := exportedOnly("exported_thing", "printf", "__fentry__")
	in := &ObjectInput{Object: "vmlinux", Layout: testlayout.Real(t), Post: post, Funcs: []Func{{Name: "changed"}},
		Resolve: func(name string, local bool) (Ref, error) {
			if name == "helper" {
				return Ref{Carry: true}, nil
			}
			return base(name, local)
		}}
	out, _, err := WriteObject(in, "__stitch_fn_0_")
	if err != nil {
		t.Fatal(err)
	}
	f, _ := elf.NewFile(bytes.NewReader(out))
	if f.Section(".text.helper") == nil {
		t.Error("helper was not carried")
	}
	syms, _ := f.Symbols()
	for _, s := range syms {
		if strings.Contains(s.Name, "helper") && s.Section == elf.SHN_UNDEF {
			t.Errorf("helper still referenced as %s", s.Name)
		}
	}
}

func TestWriteObjectEndOfArray(t *testing.T) {
	in := &ObjectInput{
		Object:  "vmlinux",
		Layout:  testlayout.Real(t),
		Post:    compile(t, "testdata/writer/endptr.c"),
		Funcs:   []Func{{Name: "walk"}},
		Resolve: exportedOnly("__fentry__", "use"),
	}
	out, _, err := WriteObject(in, "__stitch_fn_0_")
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.NewFile(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	syms, _ := f.Symbols()
	rela := f.Section(".rela.text.walk")
	if rela == nil {
		t.Fatal("no .rela.text.walk")
	}
	data, _ := rela.Data()
	found := false
	for i := 0; i+24 <= len(data); i += 24 {
		info := f.ByteOrder.Uint64(data[i+8:])
		addend := int64(f.ByteOrder.Uint64(data[i+16:]))
		if s := syms[info>>32-1]; s.Name == ".klp.sym.vmlinux.pool,0" && addend == 24*16 {
			found = true
		}
	}
	if !found {
		t.Error("no relocation to .klp.sym.vmlinux.pool,0 + 384 (the end of pool)")
	}
}

// The entries of carried code are cut out of the tables the kernel's
// layout describes; .orc_unwind, which has no relocations, follows
// .orc_unwind_ip entry for entry. A table the layout lacks is refused.
func TestWriteObjectSpecialSections(t *testing.T) {
	post := compile(t, "testdata/writer/sites.c")
	lay := testlayout.Real(t)
	in := &ObjectInput{Object: "vmlinux", Layout: lay, Post: post, Funcs: []Func{{Name: "second"}}, Resolve: exportedOnly("__fentry__")}
	out, _, err := WriteObject(in, "__stitch_fn_0_")
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.NewFile(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	data := func(name string) []byte {
		s := f.Section(name)
		if s == nil {
			t.Fatalf("output lacks %s", name)
		}
		d, _ := s.Data()
		return d
	}
	// second's entries only: its ORC entry (2s), its paravirt site.
	if d := data(".orc_unwind"); !bytes.Equal(d, bytes.Repeat([]byte{2}, 6)) {
		t.Errorf(".orc_unwind = % x, want second's entry", d)
	}
	if d := data(".orc_unwind_ip"); len(d) != 4 {
		t.Errorf(".orc_unwind_ip has %d bytes, want one entry", len(d))
	}
	if d := data(".parainstructions"); len(d) != 16 || d[9] != 7 {
		t.Errorf(".parainstructions = % x, want second's 7-byte site", d)
	}

	delete(lay.Sections, ".parainstructions") // as 6.12's
	if _, _, err := WriteObject(in, "__stitch_fn_0_"); !errors.Is(err, ErrUnpatchable) || !errors.Is(err, layout.ErrUnknownSection) {
		t.Errorf("without a layout of .parainstructions: %v", err)
	}
}

// References to the running kernel's statics use their pre-fix names
// (and the target's own name where it differs); a new global that other
// objects of the patch use stays global, and one they define is reached
// by name, inside the module.
func TestWriteObjectSymbolsOfTheFix(t *testing.T) {
	post := compile(t, "testdata/symbols/fix.c")
	var asked []string
	in := &ObjectInput{
		Object: "vmlinux",
		Layout: testlayout.Real(t),
		Post:   post,
		Funcs:  []Func{{Name: "stats_format"}, {Name: "new_helper", New: true}},
		Export: []string{"new_helper"},
		// gcc numbers the statics of fix.c xstats.0 and calls.1; the
		// pre-fix object had them as xstats.3 and calls.0.
		PreNames: map[string]string{"xstats.0": "xstats.3", "calls.1": "calls.0"},
		Resolve: func(name string, local bool) (Ref, error) {
			asked = append(asked, name)
			switch {
			case !local && name == "other_new":
				return Ref{Internal: true}, nil
			case !local:
				return Ref{Exported: true}, nil
			case name == "calls.0":
				return Ref{Object: "vmlinux", Name: "calls.7"}, nil
			}
			return Ref{Object: "vmlinux"}, nil
		},
	}
	out, _, err := WriteObject(in, "__stitch_fn_0_")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range asked {
		if n == "xstats.0" || n == "calls.1" {
			t.Errorf("resolved %s by its post-fix name", n)
		}
	}
	f, err := elf.NewFile(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	syms, _ := f.Symbols()
	got := map[string]elf.Symbol{}
	for _, s := range syms {
		got[s.Name] = s
	}
	for _, want := range []string{".klp.sym.vmlinux.xstats.3,0", ".klp.sym.vmlinux.calls.7,0", "other_new", "printf"} {
		if s, ok := got[want]; !ok || s.Section != elf.SHN_UNDEF {
			t.Errorf("no undefined %s; symbols %v", want, keys(got))
		}
	}
	if s, ok := got["new_helper"]; !ok || s.Section == elf.SHN_UNDEF || elf.ST_BIND(s.Info) != elf.STB_GLOBAL {
		t.Errorf("new_helper = %+v, want a defined global", s)
	}
	if s := got["stats_format"]; elf.ST_BIND(s.Info) != elf.STB_LOCAL {
		t.Errorf("stats_format = %+v, want local (it replaces the kernel's, through its alias)", s)
	}

	in.Export = []string{"stats_format_missing"}
	if _, _, err := WriteObject(in, "__stitch_fn_0_"); !errors.Is(err, ErrUnpatchable) {
		t.Errorf("export of a symbol the object does not carry: %v", err)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
