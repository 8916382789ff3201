// Package fingerprint identifies a function's machine code across builds
// and boots, for Ksplice's run-pre matching: the code a fix was built
// against must be the code the target kernel runs. A fingerprint is a
// hash of the function's bytes with the bytes that legitimately differ
// masked out: relocation fields (resolved at link or load time) and the
// sites the kernel rewrites at boot or load (ftrace's fentry call,
// alternatives, paravirt calls, jump labels, static calls, retpolines and
// return thunks, lock prefixes).
package fingerprint

import (
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
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

// Bytes rewritten at each site of a special section, and where in an
// entry the length lives when it varies (x86-64, Linux 6.1).
var siteSections = map[string]struct {
	entry  int // entry size
	length int // bytes rewritten at the site, if fixed
	lenAt  int // else: offset of the u8 length inside the entry
}{
	"__mcount_loc":       {8, 5, -1},
	"__jump_table":       {16, 5, -1},
	".static_call_sites": {8, 5, -1},
	".retpoline_sites":   {4, 6, -1},
	".return_sites":      {4, 5, -1},
	".smp_locks":         {4, 1, -1},
	".ibt_endbr_seal":    {4, 4, -1},
	".altinstructions":   {12, 0, 10},
	".parainstructions":  {16, 0, 9},
}

// FromObject takes the fingerprint of function fn in a relocatable object
// compiled with -ffunction-sections (the pre-fix object of a build).
func FromObject(raw []byte, fn string) (fp Fingerprint, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("corrupt ELF object (%v)", p)
		}
	}()
	f, err := elf.NewFile(bytes.NewReader(raw))
	if err != nil {
		return Fingerprint{}, err
	}
	syms, err := f.Symbols()
	if err != nil {
		return Fingerprint{}, err
	}
	var sym *elf.Symbol
	for i, s := range syms {
		if s.Name == fn && elf.ST_TYPE(s.Info) == elf.STT_FUNC && s.Section != elf.SHN_UNDEF && s.Section < elf.SHN_LORESERVE {
			sym = &syms[i]
			break
		}
	}
	if sym == nil {
		return Fingerprint{}, fmt.Errorf("function %s not found", fn)
	}
	sec := int(sym.Section)
	code, err := f.Sections[sec].Data()
	if err != nil {
		return Fingerprint{}, err
	}
	if sym.Value+sym.Size > uint64(len(code)) {
		return Fingerprint{}, fmt.Errorf("function %s extends past its section", fn)
	}
	start, end := int(sym.Value), int(sym.Value+sym.Size)
	code = code[start:end]
	var masks [][2]int
	add := func(off, n int) {
		if off+n > start && off < end {
			masks = append(masks, [2]int{off - start, n})
		}
	}
	for _, rs := range f.Sections {
		if rs.Type != elf.SHT_RELA || int(rs.Info) >= len(f.Sections) {
			continue
		}
		target := f.Sections[rs.Info]
		relas, err := readRelas(rs)
		if err != nil {
			return Fingerprint{}, err
		}
		if int(rs.Info) == sec {
			for _, r := range relas {
				add(int(r.off), fieldSize(r.typ))
			}
			continue
		}
		site, ok := siteSections[target.Name]
		if !ok {
			continue
		}
		data, err := target.Data()
		if err != nil {
			return Fingerprint{}, err
		}
		for _, r := range relas {
			// A site's first relocation names its place in the code.
			if r.off%uint64(site.entry) != 0 || r.sym == 0 || int(r.sym) > len(syms) {
				continue
			}
			s := syms[r.sym-1]
			if int(s.Section) != sec {
				continue
			}
			// Entries point at their site as symbol+addend (absolute
			// or PC-relative to the entry's own field).
			off := int(s.Value) + int(r.addend)
			n := site.length
			if site.lenAt >= 0 {
				i := int(r.off) + site.lenAt
				if i >= len(data) {
					continue
				}
				n = int(data[i])
			}
			add(off, n)
		}
	}
	fp = Fingerprint{Size: len(code), Masked: mergeMasks(masks, len(code))}
	fp.SHA256 = fp.sum(code)
	return fp, nil
}

type rela struct {
	off    uint64
	sym    uint32
	typ    elf.R_X86_64
	addend int64
}

func readRelas(s *elf.Section) ([]rela, error) {
	d, err := s.Data()
	if err != nil {
		return nil, err
	}
	var out []rela
	for i := 0; i+24 <= len(d); i += 24 {
		info := binary.LittleEndian.Uint64(d[i+8:])
		out = append(out, rela{
			off: binary.LittleEndian.Uint64(d[i:]), sym: uint32(info >> 32),
			typ: elf.R_X86_64(uint32(info)), addend: int64(binary.LittleEndian.Uint64(d[i+16:])),
		})
	}
	return out, nil
}

func fieldSize(t elf.R_X86_64) int {
	switch t {
	case elf.R_X86_64_64, elf.R_X86_64_PC64:
		return 8
	case elf.R_X86_64_16, elf.R_X86_64_PC16:
		return 2
	case elf.R_X86_64_8, elf.R_X86_64_PC8:
		return 1
	}
	return 4
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
