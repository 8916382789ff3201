// Package fingerprint identifies a function's machine code across builds
// and boots, for Ksplice's run-pre matching: the code a fix was built
// against must be the code the target kernel runs. A fingerprint is a
// hash of the function's bytes with the bytes that legitimately differ
// masked out: relocation fields (resolved at link or load time) and the
// sites the kernel rewrites at boot or load (ftrace's fentry call,
// alternatives, paravirt calls, jump labels, static calls, retpolines and
// return thunks, lock prefixes). The sites come from the object's special
// sections; where kbuild runs objtool only at link (6.12 with IBT), the
// sites objtool would list are found in the code as objtool finds them
// (ObjtoolSites).
package fingerprint

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"

	"golang.org/x/arch/x86/x86asm"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/layout"
)

// ErrMismatch means the target's code is not the code the fingerprint was
// taken from.
var ErrMismatch = errors.New("code does not match")

// Fingerprint is what the manifest records for each patched function.
type Fingerprint struct {
	Size   int      `json:"size"`
	Masked [][2]int `json:"masked"` // [offset, length] ranges left out of the hash
	SHA256 string   `json:"sha256"`
}

// Sum hashes code under the fingerprint's mask.
func (fp Fingerprint) sum(code []byte) string {
	c := bytes.Clone(code)
	for _, m := range fp.Masked {
		for i := m[0]; i < m[0]+m[1] && i < len(c); i++ {
			c[i] = 0
		}
	}
	h := sha256.Sum256(c)
	return hex.EncodeToString(h[:])
}

// Match checks code, the function as found in the target, against the
// fingerprint.
func (fp Fingerprint) Match(code []byte) error {
	if len(code) != fp.Size {
		return fmt.Errorf("%w: %d bytes, expected %d", ErrMismatch, len(code), fp.Size)
	}
	if got := fp.sum(code); got != fp.SHA256 {
		return fmt.Errorf("%w: masked sha256 %s, expected %s", ErrMismatch, got[:16], fp.SHA256[:16])
	}
	return nil
}

// MatchPadded is Match for code whose exact size is unknown (a kallsyms
// symbol ends where the next begins): past the fingerprint's size there
// may only be alignment padding, int3 or (multi-byte) nop instructions.
func (fp Fingerprint) MatchPadded(code []byte) error {
	if len(code) < fp.Size {
		return fmt.Errorf("%w: %d bytes, expected %d", ErrMismatch, len(code), fp.Size)
	}
	for off := fp.Size; off < len(code); {
		in, err := x86asm.Decode(code[off:], 64)
		if err != nil || (in.Op != x86asm.NOP && code[off] != 0xcc) {
			return fmt.Errorf("%w: code goes on past %d bytes (% x at %d)", ErrMismatch, fp.Size, code[off:min(off+4, len(code))], off)
		}
		off += in.Len
	}
	return fp.Match(code[:fp.Size])
}

// FromObject takes the fingerprint of function fn in a relocatable object
// compiled with -ffunction-sections (the pre-fix object of a build) for
// the kernel whose special-section layout is lay. An object with a
// special section lay does not describe is refused (its sites could not
// be masked).
func FromObject(raw []byte, fn string, lay *layout.Layout) (Fingerprint, error) {
	o, err := elfobj.Parse(raw)
	if err != nil {
		return Fingerprint{}, err
	}
	var names []string
	for _, sec := range o.Sections {
		names = append(names, sec.Name)
	}
	if err := lay.Check(names); err != nil {
		return Fingerprint{}, err
	}
	sym := o.Symbol(fn)
	if sym == nil || !sym.Func() || !sym.Defined() {
		return Fingerprint{}, fmt.Errorf("function %s not found", fn)
	}
	code := sym.Bytes()
	if code == nil {
		return Fingerprint{}, fmt.Errorf("function %s extends past its section", fn)
	}
	start, end := sym.Value, sym.Value+sym.Size
	var masks [][2]int
	add := func(off uint64, n int) {
		if off+uint64(n) > start && off < end {
			masks = append(masks, [2]int{int(off) - int(start), n})
		}
	}
	for _, r := range sym.Section.RelocsIn(start, end) {
		add(r.Offset, max(elfobj.SizeOf(r.Type), 1))
	}
	for _, sec := range o.Sections {
		site, ok := lay.Section(sec.Name)
		if !ok || (site.Rewrite == 0 && site.Len.Size == 0) {
			continue
		}
		for _, r := range sec.Relocs {
			// The relocation of an entry's site field names its place in
			// the code, as symbol+addend (absolute, or PC-relative to the
			// field itself, which is the same number).
			if r.Offset%uint64(site.Entry) != uint64(site.Site) || r.Symbol == nil || r.Symbol.Section != sym.Section {
				continue
			}
			n := site.Rewrite
			if site.Len.Size > 0 {
				i := r.Offset - uint64(site.Site) + uint64(site.Len.Offset)
				if i >= uint64(len(sec.Data)) {
					continue
				}
				n = int(sec.Data[i])
			}
			add(uint64(int64(r.Symbol.Value)+r.Addend), n)
		}
	}
	if lay.ObjtoolAtLink() && !objtoolRan(o) {
		for _, st := range objtoolSites(sym, code, lay) {
			add(start+uint64(st.Off), st.Len)
		}
	}
	fp := Fingerprint{Size: len(code), Masked: mergeMasks(masks, len(code))}
	fp.SHA256 = fp.sum(code)
	return fp, nil
}

// mergeMasks clips ranges to the function and merges overlaps, so the
// manifest stays short and the result does not depend on order.
func mergeMasks(ms [][2]int, size int) [][2]int {
	sort.Slice(ms, func(i, j int) bool { return ms[i][0] < ms[j][0] })
	var out [][2]int
	for _, m := range ms {
		lo, hi := max(m[0], 0), min(m[0]+m[1], size)
		if hi <= lo {
			continue
		}
		if n := len(out); n > 0 && lo <= out[n-1][0]+out[n-1][1] {
			out[n-1][1] = max(out[n-1][1], hi-out[n-1][0])
			continue
		}
		out = append(out, [2]int{lo, hi - lo})
	}
	if out == nil {
		out = [][2]int{}
	}
	return out
}
