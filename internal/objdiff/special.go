package objdiff

import (
	"debug/elf"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
)

// specialSection describes a table whose entries each annotate one place
// in a function: the kernel rewrites or consults that place at run time.
type specialSection struct {
	entsize int
	// line is the offset and width of a __LINE__ field inside an entry,
	// ignored when comparing; width 0 for none.
	lineOff, lineLen int
}

// specialSections are the x86-64 tables of Linux 6.1 whose entries
// describe the code of one function. Tables derived from code alone
// (ORC, mcount, retpoline and return sites) are not listed: they change
// only when the code does.
var specialSections = map[string]specialSection{
	// struct bug_entry with relative pointers and BUGVERBOSE:
	// bug_addr_disp, file_disp, line, flags.
	"__bug_table": {entsize: 12, lineOff: 8, lineLen: 2},
	// struct exception_table_entry: insn, fixup, data.
	"__ex_table": {entsize: 12},
	// struct jump_entry: code, target, key.
	"__jump_table": {entsize: 16},
	// struct alt_instr: instr_offset, repl_offset, cpuid, instrlen, replacementlen.
	".altinstructions": {entsize: 12},
	// struct static_call_site: addr, key.
	".static_call_sites": {entsize: 8},
	// struct paravirt_patch_site: instr, type, len.
	".parainstructions": {entsize: 16},
	".smp_locks":        {entsize: 4},
}

// entryGroups splits the special sections of an object into entries and
// groups the signature of the entries by the function they annotate.
// Keys are function symbols; the signature is comparable across objects.
func entryGroups(s side) map[*elfobj.Symbol][]string {
	groups := map[*elfobj.Symbol][]string{}
	for _, sec := range s.obj.Sections {
		spec, ok := specialSections[sec.Name]
		if !ok || sec.Data == nil {
			continue
		}
		n := spec.entsize
		for off := 0; off+n <= len(sec.Data); off += n {
			relocs := sec.RelocsIn(uint64(off), uint64(off+n))
			var owner *elfobj.Symbol
			for _, r := range relocs {
				if t, _ := r.Target(); t != nil && t.Type == elf.STT_FUNC {
					owner = t
					break
				}
			}
			if owner == nil {
				continue
			}
			entry := masked(sec.Data[off:off+n], relocs, uint64(off))
			for i := 0; i < spec.lineLen; i++ {
				entry[spec.lineOff+i] = 0
			}
			var b strings.Builder
			b.WriteString(sec.Name)
			b.WriteByte(':')
			b.Write(entry)
			for _, r := range relocs {
				b.WriteString("|" + r.Type.String() + "=" + s.ident(r))
			}
			groups[owner] = append(groups[owner], b.String())
		}
	}
	return groups
}
