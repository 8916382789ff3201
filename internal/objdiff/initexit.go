package objdiff

import (
	"debug/elf"
	"fmt"
	"slices"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
)

// initProblem is the refusal of a changed __init or __exit function. Its
// reason names what the running kernel keeps of the function's work (the
// variables it writes or hands out, the functions it calls to register
// things): that is what a callback must redo, or what the fix author
// must show nothing depends on, before the rest of the fix can go live.
func initProblem(f *elfobj.Symbol) Problem {
	data, calls := initEffects(f)
	var kept []string
	if len(data) > 0 {
		kept = append(kept, "it writes or hands out "+list(data))
	}
	if len(calls) > 0 {
		kept = append(kept, "it calls or passes on "+list(calls))
	}
	what := "it keeps no variable of this file and calls nothing"
	if len(kept) > 0 {
		what = strings.Join(kept, "; ")
	}
	p := Problem{Kind: KindInit, Symbol: f.Name}
	if initKind(f) == "__exit" {
		p.Reason = fmt.Sprintf("%s is __exit code (section %s): a module runs it only at unload, through its mod->exit, which livepatch cannot redirect (%s); install the fixed exit from the module's pre-patch callback (stitch_replace_exit) and declare STITCH_CARRIES_INIT(%s) in a hooks file, or leave the exit change out of the fix", f.Name, f.Section.Name, what, f.Name)
		return p
	}
	p.Reason = fmt.Sprintf("%s is __init code (section %s): it ran when the kernel booted or the module loaded, and the running kernel keeps what it set up (%s), which patching it cannot change; redo the change on the live state in a pre-patch callback and declare STITCH_CARRIES_INIT(%s) in a hooks file, or leave the init change out of the fix", f.Name, f.Section.Name, what, f.Name)
	return p
}

// initEffects lists the file's writable variables init code refers to
// and the functions it calls, as far as its relocations show.
func initEffects(f *elfobj.Symbol) (data, calls []string) {
	for _, r := range f.Section.RelocsIn(f.Value, f.Value+f.Size) {
		t, _ := r.Target()
		if t == nil || t == f || t.Type == elf.STT_SECTION {
			continue
		}
		switch {
		case t.Type == elf.STT_FUNC || (!t.Defined() && r.Type == elf.R_X86_64_PLT32):
			if t.Name != "__fentry__" && !strings.HasPrefix(t.Name, "__x86_") && !slices.Contains(calls, t.Name) {
				calls = append(calls, t.Name)
			}
		case t.Defined() && t.Section.Flags&elf.SHF_WRITE != 0 && !isInitData(t.Section.Name):
			if !slices.Contains(data, t.Name) {
				data = append(data, t.Name)
			}
		}
	}
	return data, calls
}

// isInitData tells whether a section is freed with init code.
func isInitData(sec string) bool {
	return strings.HasPrefix(sec, ".init.") || strings.HasPrefix(sec, ".exit.")
}

// markExitOnly sets ExitOnly on the refusals of changed __exit functions
// that no code of the post object refers to.
func markExitOnly(res *Result, post *elfobj.Object) {
	for i, p := range res.Unsafe {
		if f := post.Symbol(p.Symbol); p.Kind == KindInit && f != nil && f.Defined() && initKind(f) == "__exit" {
			res.Unsafe[i].ExitOnly = !calledFromCode(post, f)
		}
	}
}

// calledFromCode tells whether any code of the object refers to f.
func calledFromCode(o *elfobj.Object, f *elfobj.Symbol) bool {
	for _, sec := range o.Sections {
		if !sec.Executable() {
			continue
		}
		for _, r := range sec.Relocs {
			if t, _ := r.Target(); t == f {
				return true
			}
		}
	}
	return false
}

// list names at most six items.
func list(items []string) string {
	if len(items) > 6 {
		return strings.Join(items[:6], ", ") + fmt.Sprintf(" and %d more", len(items)-6)
	}
	return strings.Join(items, ", ")
}
