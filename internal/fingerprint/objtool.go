package fingerprint

import (
	"bytes"
	"debug/elf"
	"fmt"
	"strings"

	"golang.org/x/arch/x86/x86asm"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/layout"
)

// Site is a place in a function's code that the kernel rewrites at boot
// (or at module load) although the compiled object has no table listing
// it: kbuild runs objtool, which writes those tables, on vmlinux.o and on
// whole modules only (layout.Layout.ObjtoolAtLink).
type Site struct {
	Kind string `json:"kind"` // the objtool table that lists it in the kernel
	Off  int    `json:"off"`  // from the function's start
	Len  int    `json:"len"`  // the instruction's length: what the kernel rewrites
}

// endbr64 is the instruction gcc -fcf-protection=branch puts at the
// entry of every function that may be called indirectly.
var endbr64 = []byte{0xf3, 0x0f, 0x1e, 0xfa}

// objtoolRan tells whether objtool processed the object (a module of a
// single object is, even where objtool waits for the link): it then has
// ORC data or one of objtool's tables, which are exact and are masked as
// any table is.
func objtoolRan(o *elfobj.Object) bool {
	for _, sec := range o.Sections {
		if sec != nil && layout.Objtool(sec.Name) {
			return true
		}
	}
	return false
}

// ObjtoolSites finds the sites objtool would list for function fn of an
// object compiled for the kernel of lay (in vmlinux.o or in the module),
// as objtool finds them: the instructions whose relocation names a
// global return thunk, retpoline thunk or static call trampoline. It
// also lists the function's entry ENDBR64, which the kernel seals into a
// NOP when objtool found no indirect reference to the function; whether
// it did depends on code outside the object. Only the kinds the kernel
// rewrites (its image has their tables) are listed; an object objtool
// has processed needs none (nil).
func ObjtoolSites(raw []byte, fn string, lay *layout.Layout) ([]Site, error) {
	o, err := elfobj.Parse(raw)
	if err != nil {
		return nil, err
	}
	sym := o.Symbol(fn)
	if sym == nil || !sym.Func() || !sym.Defined() {
		return nil, fmt.Errorf("function %s not found", fn)
	}
	code := sym.Bytes()
	if code == nil || !lay.ObjtoolAtLink() || objtoolRan(o) {
		return nil, nil
	}
	return objtoolSites(sym, code, lay), nil
}

// objtoolSites is ObjtoolSites for a function already found.
func objtoolSites(sym *elfobj.Symbol, code []byte, lay *layout.Layout) []Site {
	var sites []Site
	// apply_seal_endbr poisons the ENDBR64 at the address objtool listed
	// in .ibt_endbr_seal, 4 bytes.
	if lay.InImage(".ibt_endbr_seal") && bytes.HasPrefix(code, endbr64) {
		sites = append(sites, Site{Kind: ".ibt_endbr_seal", Off: 0, Len: len(endbr64)})
	}
	_, staticCalls := lay.Section(".static_call_sites")
	var insns []int // instruction starts, decoded on first need
	var decoded int // how far decoding went
	for _, r := range sym.Section.RelocsIn(sym.Value, sym.Value+sym.Size) {
		// objtool's classify_symbols: global symbols by name.
		if r.Symbol == nil || r.Symbol.Bind != elf.STB_GLOBAL {
			continue
		}
		var kind string
		switch name := r.Symbol.Name; {
		case name == "__x86_return_thunk" && lay.InImage(".return_sites"):
			kind = ".return_sites"
		case strings.HasPrefix(name, "__x86_indirect_") && lay.InImage(".retpoline_sites"):
			kind = ".retpoline_sites"
		case strings.HasPrefix(name, "__SCT__") && staticCalls:
			kind = ".static_call_sites"
		default:
			continue
		}
		if insns == nil {
			insns, decoded = starts(code)
		}
		off := int(r.Offset - sym.Value)
		cands := insns
		if off >= decoded {
			// Past an instruction x86asm does not know: the branch's
			// opcode is right before its rel32 field.
			cands = []int{off - 2, off - 1}
		}
		at, n, op, ok := branchAt(code, cands, off)
		if !ok {
			continue // not a branch to the symbol: objtool lists none
		}
		if kind == ".return_sites" && op != x86asm.JMP {
			// apply_returns rewrites JMP32 only; a Jcc to the thunk
			// it warns about and leaves.
			continue
		}
		sites = append(sites, Site{Kind: kind, Off: at, Len: n})
	}
	return sites
}

// starts decodes code from its beginning (objtool decodes every
// instruction of a function) and returns where each instruction starts,
// as far as decoding goes, and where decoding stopped.
func starts(code []byte) ([]int, int) {
	var out []int
	off := 0
	for off < len(code) {
		out = append(out, off)
		if bytes.HasPrefix(code[off:], endbr64) {
			off += len(endbr64) // x86asm does not know it
			continue
		}
		in, err := x86asm.Decode(code[off:], 64)
		if err != nil || in.Len == 0 {
			return out[:len(out)-1], off
		}
		off += in.Len
	}
	return out, off
}

// branchAt finds the direct branch whose rel32 field is at off: a CALL,
// JMP (e8, e9, with the CS prefix gcc -mindirect-branch-cs-prefix puts
// before a retpoline thunk's) or Jcc (0f 8x) rel32. It returns its start,
// length and operation.
func branchAt(code []byte, insns []int, off int) (start, n int, op x86asm.Op, ok bool) {
	for _, s := range insns {
		if s > off {
			break
		}
		if s < 0 || s+6 < off {
			continue
		}
		in, err := x86asm.Decode(code[s:], 64)
		if err != nil || s+in.Len != off+4 {
			continue
		}
		b := code[s:off]
		switch {
		case len(b) == 1 && (b[0] == 0xe8 || b[0] == 0xe9),
			len(b) == 2 && b[0] == 0x2e && (b[1] == 0xe8 || b[1] == 0xe9),
			len(b) == 2 && b[0] == 0x0f && b[1]&0xf0 == 0x80:
			return s, in.Len, in.Op, true
		}
	}
	return 0, 0, 0, false
}
