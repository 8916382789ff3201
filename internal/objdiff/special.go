package objdiff

import (
	"debug/elf"
	"slices"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/layout"
)

// unknownSpecials records the special sections of an object that its
// kernel's layout does not describe: their entries cannot be compared
// without guessing their format.
func (d *differ) unknownSpecials(o *elfobj.Object) {
	for _, sec := range o.Sections {
		err := d.lay.Check([]string{sec.Name})
		if err == nil || slices.ContainsFunc(d.res.Unsafe, func(p Problem) bool { return p.Kind == KindSpecialSection && p.Symbol == sec.Name }) {
			continue
		}
		d.res.unsafe(KindSpecialSection, sec.Name, err.Error())
	}
}

// entryGroups splits the special sections of an object into entries and
// groups the signature of the entries by the function they annotate.
// Keys are function symbols; the signature is comparable across objects.
// Tables derived from the code alone (ORC, mcount, retpoline and return
// sites) are left out: they change only when the code does.
func entryGroups(s side, lay *layout.Layout) map[*elfobj.Symbol][]string {
	groups := map[*elfobj.Symbol][]string{}
	for _, sec := range s.obj.Sections {
		spec, ok := lay.Section(sec.Name)
		if !ok || spec.Derived || spec.Follows != "" || sec.Data == nil {
			continue
		}
		n := spec.Entry
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
			// A __LINE__ is ignored: it moves with the lines above.
			for i := 0; i < spec.Line.Size; i++ {
				entry[spec.Line.Offset+i] = 0
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
