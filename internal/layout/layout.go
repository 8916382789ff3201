// Package layout knows the special sections of an x86-64 kernel: the
// tables whose entries each point at one place in the code, which the
// kernel rewrites (alternatives, jump labels, static calls, ...) or
// consults (bug and exception tables) at run time. Stitch needs their
// entry formats to mask the rewritten bytes for run-pre matching, to
// compare the entries of two builds, and to carry the entries of patched
// functions into a livepatch module.
//
// The formats change between kernel series (6.12's struct alt_instr is
// 14 bytes, 6.1's 12; 6.12 has no .parainstructions), so they are read
// from the kernel's own BTF, never assumed. What BTF cannot say is fixed
// here, once, with the reason: the tables that are plain arrays of
// offsets, and how many bytes the kernel rewrites at a site of each kind
// (an instruction-set fact). A kernel without BTF, or without a struct
// every x86-64 kernel has, has no Layout (ErrNoLayout): Stitch refuses to
// build for it. An object with a special section its kernel's Layout
// does not have is refused too (ErrUnknownSection). The layout also
// records which of objtool's tables the kernel image has: where kbuild
// runs objtool only at link (6.12's CONFIG_X86_KERNEL_IBT), an object
// compiled alone has none of them, and the kernel's facts say which
// sites it will rewrite nonetheless.
//
// The package uses the standard library only: the agent links it
// through the fingerprint package.
package layout

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
)

var (
	// ErrNoLayout means the kernel's special-section layouts cannot be
	// read from it: a build for it would have to guess them, and is
	// refused.
	ErrNoLayout = errors.New("the kernel's special-section layouts cannot be read (a build for it is refused rather than guessed)")
	// ErrUnknownSection means an object has a special section that its
	// kernel's layout does not describe.
	ErrUnknownSection = errors.New("special section not in the kernel's layout")
)

// Section is the layout of one special section: an array of entries, each
// naming one place (the site) in the code by a relocation.
type Section struct {
	Name string `json:"name"`
	// Struct is the kernel struct an entry is (read from BTF); empty for
	// a plain array of offsets or addresses.
	Struct string `json:"struct,omitempty"`
	Entry  int    `json:"entry"` // bytes per entry
	// Site is the offset in an entry of the field that locates the site:
	// its relocation is symbol+addend of the place in the code.
	Site int `json:"site"`
	// Rewrite is how many bytes at the site the kernel rewrites, when
	// that is fixed; Len is the u8 field of the entry that says it, when
	// not. Neither: the kernel only reads the code at the site.
	Rewrite int   `json:"rewrite,omitempty"`
	Len     Field `json:"len,omitzero"`
	// Line is a __LINE__ field, which differs between builds of the same
	// code when lines above move.
	Line Field `json:"line,omitzero"`
	// Derived: the compiler or objtool writes one entry per instruction
	// of a kind, so the code alone decides the entries.
	Derived bool `json:"derived,omitempty"`
	// Follows names the section this one parallels entry for entry (it
	// has no relocations of its own): .orc_unwind follows .orc_unwind_ip.
	Follows string `json:"follows,omitempty"`
}

// Layout is the set of special sections one kernel has, with their
// formats.
type Layout struct {
	// Source says where the layout was read from, for messages.
	Source   string             `json:"source"`
	Sections map[string]Section `json:"sections"`
	// Image lists the objtool tables the kernel image itself has (its
	// section headers name them): the sites of these kinds the kernel
	// rewrites in its own code at boot, and in its modules' at load.
	// Empty when the layout was read from BTF alone.
	Image []string `json:"image,omitempty"`
}

// objtoolTables are the special sections objtool writes (the compiler
// writes the others); the image keeps each in a section of its name.
var objtoolTables = []string{".retpoline_sites", ".return_sites", ".call_sites", ".ibt_endbr_seal", ".static_call_sites", ".orc_unwind_ip", ".orc_unwind"}

// Objtool tells whether objtool writes the special section name.
func Objtool(name string) bool { return slices.Contains(objtoolTables, name) }

// InImage tells whether the kernel image has the objtool table name, so
// that the kernel rewrites the sites of its kind.
func (l *Layout) InImage(name string) bool {
	return l != nil && slices.Contains(l.Image, name)
}

// ObjtoolAtLink tells whether kbuild runs objtool on vmlinux.o and on
// each module as a whole rather than on each object (its delay-objtool,
// set by CONFIG_X86_KERNEL_IBT): then an object compiled alone has none
// of objtool's tables though the kernel rewrites their sites, which must
// be found in its code as objtool finds them. The image of such a kernel
// has .ibt_endbr_seal, which only objtool --ibt writes.
func (l *Layout) ObjtoolAtLink() bool { return l.InImage(".ibt_endbr_seal") }

// spec says where a special section's layout comes from.
type spec struct {
	name string
	// A table of structs: the struct, the member(s) that may locate the
	// site (the first one present), the u8 member saying how many bytes
	// are rewritten, and a __LINE__ member.
	strct    string
	site     []string
	length   string
	line     string
	required bool // every x86-64 kernel has it: without it, BTF is not to be trusted
	// A plain array: bytes per element (no struct describes it).
	elem int
	// Bytes the kernel rewrites at a site (see the table).
	rewrite int
	derived bool
	follows string
}

// specs are the special sections of the x86-64 kernels Stitch builds for
// (6.1 to 6.12), and what is fixed about each. The rewrite sizes are
// instruction facts, the same in every series:
//   - __mcount_loc: the 5-byte `call __fentry__` that ftrace turns into a
//     5-byte NOP at boot, and back into a call while tracing;
//   - __jump_table: a static branch, a 5-byte NOP or `jmp rel32` (a
//     2-byte jmp at some sites: masking 5 covers both);
//   - .static_call_sites: the 5-byte call or jmp to the trampoline, which
//     the kernel points at the current target;
//   - .retpoline_sites: a call or jmp through a retpoline thunk (5 bytes)
//     or a conditional jump to one (6 bytes), replaced by the indirect
//     branch (or an LFENCE'd one): 6 covers the longest;
//   - .return_sites: the 5-byte `jmp __x86_return_thunk`, turned into a
//     `ret` and INT3 padding when the mitigation allows;
//   - .call_sites: a 5-byte direct call, redirected to a call-depth
//     accounting thunk (6.2+);
//   - .smp_locks: a 1-byte LOCK prefix, turned into a DS prefix on one
//     CPU;
//   - .ibt_endbr_seal: a 4-byte ENDBR64 of a function never called
//     indirectly, sealed into a 4-byte NOP;
//   - .altinstructions and .parainstructions: the entry says how many
//     bytes its replacement overwrites.
//
// The plain arrays are s32 offsets relative to the entry (objtool's
// tables, and .smp_locks) or unsigned long addresses (__mcount_loc):
// their format has not changed since they appeared, and which of them
// an object has follows from its kernel's configuration, so every
// Layout includes them.
var specs = []spec{
	{name: "__bug_table", strct: "bug_entry", site: []string{"bug_addr_disp", "bug_addr"}, line: "line", required: true},
	{name: "__ex_table", strct: "exception_table_entry", site: []string{"insn"}, required: true},
	{name: "__jump_table", strct: "jump_entry", site: []string{"code"}, rewrite: 5},
	{name: ".altinstructions", strct: "alt_instr", site: []string{"instr_offset"}, length: "instrlen", required: true},
	{name: ".static_call_sites", strct: "static_call_site", site: []string{"addr"}, rewrite: 5},
	{name: ".parainstructions", strct: "paravirt_patch_site", site: []string{"instr"}, length: "len"},
	{name: ".orc_unwind", strct: "orc_entry", derived: true, follows: ".orc_unwind_ip"},
	{name: ".orc_unwind_ip", elem: 4, derived: true},
	{name: ".retpoline_sites", elem: 4, rewrite: 6, derived: true},
	{name: ".return_sites", elem: 4, rewrite: 5, derived: true},
	{name: ".call_sites", elem: 4, rewrite: 5, derived: true},
	{name: ".ibt_endbr_seal", elem: 4, rewrite: 4, derived: true},
	{name: ".smp_locks", elem: 4, rewrite: 1},
	{name: "__mcount_loc", elem: 8, rewrite: 5, derived: true},
}

// FromVmlinux reads the layout of the kernel whose vmlinux (an ELF file,
// as extracted from its boot image) is at path.
func FromVmlinux(path string) (*Layout, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read layouts: %w", err)
	}
	defer f.Close()
	l, err := fromELF(f, path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return l, nil
}

// FromELF is FromVmlinux for a vmlinux held in memory.
func FromELF(data []byte) (*Layout, error) {
	return fromELF(bytes.NewReader(data), "vmlinux")
}

func fromELF(r io.ReaderAt, name string) (l *Layout, err error) {
	// debug/elf is not hardened against every malformed file.
	defer func() {
		if p := recover(); p != nil {
			l, err = nil, fmt.Errorf("%w: malformed ELF file: %v", ErrNoLayout, p)
		}
	}()
	f, err := elf.NewFile(r)
	if err != nil {
		return nil, fmt.Errorf("%w: not an ELF file: %v", ErrNoLayout, err)
	}
	if f.Machine != elf.EM_X86_64 || f.Class != elf.ELFCLASS64 {
		return nil, fmt.Errorf("%w: a %v %v kernel; Stitch knows the special sections of x86-64 only", ErrNoLayout, f.Class, f.Machine)
	}
	sec := f.Section(".BTF")
	if sec == nil || sec.Type == elf.SHT_NOBITS {
		return nil, fmt.Errorf("%w: no .BTF section (the kernel was built without CONFIG_DEBUG_INFO_BTF)", ErrNoLayout)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("%w: read .BTF: %v", ErrNoLayout, err)
	}
	l, err = fromBTF(data, "BTF of "+name)
	if err != nil {
		return nil, err
	}
	for _, t := range objtoolTables {
		if s := f.Section(t); s != nil && s.Size > 0 {
			l.Image = append(l.Image, t)
		}
	}
	return l, nil
}

// FromBTF reads the layout from a kernel's BTF (its .BTF section).
func FromBTF(data []byte) (*Layout, error) {
	return fromBTF(data, "BTF")
}

func fromBTF(data []byte, source string) (*Layout, error) {
	b, err := ParseBTF(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoLayout, err)
	}
	l := &Layout{Source: source, Sections: map[string]Section{}}
	for _, sp := range specs {
		s := Section{Name: sp.name, Rewrite: sp.rewrite, Derived: sp.derived, Follows: sp.follows}
		if sp.strct == "" {
			s.Entry = sp.elem
			l.Sections[sp.name] = s
			continue
		}
		st, err := b.Struct(sp.strct)
		if errors.Is(err, errNoType) && !sp.required {
			continue // the kernel has no such table
		}
		if err != nil {
			return nil, fmt.Errorf("%w: struct %s (entries of %s): %w", ErrNoLayout, sp.strct, sp.name, err)
		}
		if err := fill(b, st, sp, &s); err != nil {
			return nil, fmt.Errorf("%w: struct %s (entries of %s): %w", ErrNoLayout, sp.strct, sp.name, err)
		}
		l.Sections[sp.name] = s
	}
	return l, nil
}

// fill sets what s takes from struct st.
func fill(b *BTF, st *Struct, sp spec, s *Section) error {
	s.Struct = st.Name
	if st.Size == 0 || st.Size > 1<<10 {
		return fmt.Errorf("%d bytes: not a table entry", st.Size)
	}
	s.Entry = int(st.Size)
	if len(sp.site) > 0 {
		var f Field
		var err error
		for _, m := range sp.site {
			if f, err = b.Field(st, m); err == nil {
				break
			}
		}
		if err != nil {
			return fmt.Errorf("no member %s locates the site: %w", strings.Join(sp.site, " or "), err)
		}
		if f.Size != 4 && f.Size != 8 {
			return fmt.Errorf("the site field %d bytes long: neither an offset nor an address", f.Size)
		}
		s.Site = f.Offset
	}
	if sp.length != "" {
		f, err := b.Field(st, sp.length)
		if err != nil {
			return err
		}
		if f.Size != 1 {
			return fmt.Errorf("%s.%s is %d bytes, not a u8: the length of a site is read as one byte", st.Name, sp.length, f.Size)
		}
		s.Len = f
	}
	if sp.line != "" {
		// Without CONFIG_DEBUG_BUGVERBOSE there is no line to ignore.
		if f, err := b.Field(st, sp.line); err == nil {
			s.Line = f
		} else if _, ok := st.Member(sp.line); ok {
			return err
		}
	}
	return nil
}

// Section returns the layout of the special section name, if the kernel
// has one of that name.
func (l *Layout) Section(name string) (Section, bool) {
	if l == nil {
		return Section{}, false
	}
	s, ok := l.Sections[name]
	return s, ok
}

// isSpecial tells whether name is a special section of some x86-64
// kernel, whether or not a given kernel has it.
func isSpecial(name string) bool {
	return slices.ContainsFunc(specs, func(s spec) bool { return s.name == name })
}

// Check refuses the special sections among names (an object's sections)
// that the kernel's layout does not describe: their entries cannot be
// read without guessing their format. Other sections are not its
// business.
func (l *Layout) Check(names []string) error {
	var unknown []string
	for _, n := range names {
		if _, ok := l.Section(n); ok || !isSpecial(n) || slices.Contains(unknown, n) {
			continue
		}
		unknown = append(unknown, n)
	}
	if len(unknown) == 0 {
		return nil
	}
	var why []string
	for _, n := range unknown {
		i := slices.IndexFunc(specs, func(s spec) bool { return s.name == n })
		w := n
		if specs[i].strct != "" {
			w += " (no struct " + specs[i].strct + ")"
		}
		why = append(why, w)
	}
	src := "no layout"
	if l != nil {
		src = l.Source
	}
	return fmt.Errorf("%w: %s: the object has %s, which this kernel does not (was it compiled for another kernel?)", ErrUnknownSection, src, strings.Join(why, ", "))
}
