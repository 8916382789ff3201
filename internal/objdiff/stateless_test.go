package objdiff

import (
	"debug/elf"
	"testing"

	"github.com/stitchpatch/stitch/internal/elfobj"
)

// A lockdep class key without lockdep is an empty object in .bss: a new
// copy of it (code carried in a patch calls mutex_init) loses no state.
func TestStatelessEmpty(t *testing.T) {
	bss := &elfobj.Section{Name: ".bss", Flags: elf.SHF_WRITE | elf.SHF_ALLOC}
	if !stateless(&elfobj.Symbol{Name: "__key.113", Section: bss, Size: 0}) {
		t.Error("an empty object in .bss is not stateless")
	}
	if stateless(&elfobj.Symbol{Name: "count.1", Section: bss, Size: 4}) {
		t.Error("a 4-byte variable in .bss is stateless")
	}
}
