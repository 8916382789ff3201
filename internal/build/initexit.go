package build

import (
	"fmt"
	"slices"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/objdiff"
)

// initCarried tells whether the hooks take care of a changed __init or
// __exit function (STITCH_CARRIES_INIT): the declaration names the
// function or an alias of it (module_init makes init_module an alias of
// the module's init function, module_exit cleanup_module of its exit
// function). Such a function is left out of the patch: its code has
// run, or runs at unload from mod->exit, never through ftrace.
func initCarried(c compiled, p objdiff.Problem, carries []string) (bool, error) {
	if p.Kind != objdiff.KindInit || len(carries) == 0 {
		return false, nil
	}
	if slices.Contains(carries, p.Symbol) {
		return true, nil
	}
	if c.Post == nil {
		return false, nil
	}
	post, err := elfobj.Parse(c.Post)
	if err != nil {
		return false, fmt.Errorf("%s: %w", c.Source, err)
	}
	s := post.Symbol(p.Symbol)
	if s == nil || !s.Defined() {
		return false, nil
	}
	for _, n := range carries {
		a := post.Symbol(n)
		if a != nil && a.Defined() && a.Section == s.Section && a.Value == s.Value {
			return true, nil
		}
	}
	return false, nil
}

// initSection tells whether a function's section is __init or __exit
// code.
func initSection(sec string) bool {
	return strings.HasPrefix(sec, ".init.") || strings.HasPrefix(sec, ".exit.") || sec == ".head.text"
}

// builtinExit tells whether a refusal is of __exit code built into
// vmlinux that no code of its object calls: the kernel never unloads
// built-in code, so nothing ever runs it and its change needs nothing
// live. (A module's exit runs at unload: hooks must carry it.)
func builtinExit(c compiled, p objdiff.Problem) bool {
	return c.Object == "vmlinux" && p.Kind == objdiff.KindInit && p.ExitOnly
}
