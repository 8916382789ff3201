package objdiff

import (
	"debug/elf"
	"fmt"
	"strings"

	"golang.org/x/arch/x86/x86asm"

	"github.com/stitchpatch/stitch/internal/elfobj"
)

// readOnlyUsers decides whether changed writable data may be carried as
// a new copy, as constant data is: when nothing but this object's
// functions reaches it, and they only read it through memory operands
// (a load, a compare), the running kernel's copy holds nothing the new
// one would lose, and replacing those functions makes them all use the
// new one. Any other use keeps the running kernel's copy live: a store
// (state the copy would lose), an address taken (lea, an immediate: the
// address can reach code the patch does not replace, a registration
// list, another table), a reference from data, or a global symbol other
// objects can reach. why names the first such use.
func readOnlyUsers(db *elfobj.Symbol, referrers map[*elfobj.Symbol][]*elfobj.Symbol) (users []*elfobj.Symbol, why string) {
	if !db.Local() {
		return nil, fmt.Sprintf("%s is a global symbol: other objects may use it", db.Name)
	}
	for _, r := range referrers[db] {
		if r.Type != elf.STT_FUNC {
			return nil, fmt.Sprintf("data %s (section %s) refers to it", r.Name, r.Section.Name)
		}
		if isInit(r) {
			return nil, fmt.Sprintf("%s code %s refers to it: what it registered or set up with it at load still uses the running copy", initKind(r), r.Name)
		}
		if use := escapingUse(r, db); use != "" {
			return nil, fmt.Sprintf("%s %s", r.Name, use)
		}
		users = append(users, r)
	}
	if len(users) == 0 {
		return nil, "no function uses it"
	}
	return users, ""
}

// escapingUse returns how function f uses data s other than by reading it
// through a memory operand, or "".
func escapingUse(f, s *elfobj.Symbol) string {
	code := f.Bytes()
	if code == nil {
		return "cannot be decoded"
	}
	var refs []uint64 // offsets into f of the fields that refer to s
	for _, r := range f.Section.RelocsIn(f.Value, f.Value+f.Size) {
		if t, _ := r.Target(); t == s {
			refs = append(refs, r.Offset-f.Value)
		}
	}
	for pc := uint64(0); pc < uint64(len(code)) && len(refs) > 0; {
		inst, err := x86asm.Decode(code[pc:], 64)
		if err != nil {
			return fmt.Sprintf("cannot be decoded at +%#x", pc)
		}
		end := pc + uint64(inst.Len)
		for len(refs) > 0 && refs[0] < end {
			if refs[0] < pc {
				return fmt.Sprintf("refers to it from inside an instruction at +%#x", refs[0])
			}
			if !loads(inst) {
				return fmt.Sprintf("takes its address or writes it (%s at +%#x)", strings.ToLower(inst.Op.String()), pc)
			}
			refs = refs[1:]
		}
		pc = end
	}
	if len(refs) > 0 {
		return "refers to it past its code"
	}
	return ""
}

// loads tells whether inst only reads the memory its memory operand
// names: the operand is a source (not the destination, which x86asm lists
// first), or the instruction reads both of its operands.
func loads(inst x86asm.Inst) bool {
	mem := -1
	for i, a := range inst.Args {
		if a == nil {
			break
		}
		switch a.(type) {
		case x86asm.Mem:
			mem = i
		case x86asm.Imm:
			return false // the address as a value
		}
	}
	switch {
	case mem < 0 || inst.Op == x86asm.LEA:
		return false
	case mem > 0:
		return inst.Op != x86asm.XCHG && inst.Op != x86asm.XADD && inst.Op != x86asm.CMPXCHG
	}
	switch inst.Op {
	case x86asm.CMP, x86asm.TEST, x86asm.BT, x86asm.PUSH:
		return true
	}
	return false
}

func funcNames(fs []*elfobj.Symbol) string {
	names := make([]string, len(fs))
	for i, f := range fs {
		names[i] = f.Name
	}
	return strings.Join(names, ", ")
}
