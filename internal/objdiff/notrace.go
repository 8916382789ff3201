package objdiff

import (
	"debug/elf"
	"fmt"
	"slices"
	"strings"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/layout"
)

// maxNotraceDepth bounds the chain of notrace callers followed up from a
// changed notrace function: each link is a function the patch replaces
// only so that it calls the next one's copy.
const maxNotraceDepth = 4

// notraceUse is how the object reaches a function: direct calls (or
// tail jumps) from functions, pointers to it in data, and references
// that take its address in code.
type notraceUse struct {
	callers  []*elfobj.Symbol // functions that call or jump to its entry
	data     []*elfobj.Symbol // data objects holding its address
	roData   []string         // of those, the read-only ones, for messages
	address  []string         // functions taking its address (not a call)
	stray    []string         // references from outside any symbol (section names)
	initCall []string         // init or exit code calling it
}

// notraceInCallers handles the changed functions ftrace cannot redirect
// because they have no __fentry__ call: the kernel's inline functions
// are notrace, and so is everything of a file built without -pg (all of
// kernel/trace/). A file-local one whose every reference in the object
// is a direct call from functions the patch can redirect is carried as a
// new copy, and those callers are replaced to call it; a notrace caller
// needs its own callers in turn. One that data points to is carried the
// same way when the data is writable, but the build keeps it refused
// unless the fix's hooks re-point that data (KindNoFentryData). Anything
// else another path reaches (a global function, an address taken in
// code, a read-only table) stays refused, with why.
func (d *differ) notraceInCallers() {
	depth := map[*elfobj.Symbol]int{}
	var uses map[*elfobj.Symbol]*notraceUse
	for i := 0; i < len(d.changed); i++ {
		f := d.changed[i]
		if hasFentry(f) || coldParent(f.Name) != "" || isInit(f) {
			continue
		}
		if uses == nil {
			uses = usesOf(d.b.obj, d.lay)
		}
		reason, ok := d.redirectable(f, uses[f], depth[f])
		if !ok {
			d.refuseNotrace(f, KindNoFentry, reason)
			continue
		}
		u := uses[f]
		d.changed = slices.Delete(d.changed, i, i+1)
		i--
		d.news = append(d.news, f)
		d.notrace[f] = true
		d.res.Unsafe = slices.DeleteFunc(d.res.Unsafe, func(p Problem) bool { return p.Kind == KindNoFentry && p.Symbol == f.Name })
		route := NotraceRoute{Func: f.Name, Callers: []string{}}
		for _, c := range u.callers {
			if p := coldParent(c.Name); p != "" {
				// A split-out part is replaced with its parent.
				if ps := d.b.obj.Symbol(p); ps != nil {
					c = ps
				}
			}
			if !slices.Contains(route.Callers, c.Name) {
				route.Callers = append(route.Callers, c.Name)
			}
			if d.unchanged[c] {
				d.replace(c)
			}
			if !hasFentry(c) && depth[c] == 0 {
				depth[c] = depth[f] + 1
			}
		}
		for _, s := range u.data {
			route.Data = append(route.Data, s.Name)
		}
		slices.Sort(route.Callers)
		d.res.Notrace = append(d.res.Notrace, route)
		if len(u.data) > 0 {
			d.res.unsafe(KindNoFentryData, f.Name, fmt.Sprintf("%s changed but has no __fentry__ call, and %s point%s to it: ftrace cannot redirect it, so calls through %s would still run the old code; the patch carries a new copy of %s, and a hooks file can re-point the pointer%s to the copy when the patch goes on and back when it goes off (STITCH_REDIRECTS(%s) and STITCH_NEW(%s), docs/fix-author.md)", f.Name, strings.Join(route.Data, ", "), plural(len(u.data), "", "s"), them(len(u.data)), f.Name, plural(len(u.data), "s", ""), f.Name, f.Name))
		}
	}
}

// redirectable tells whether every path to the notrace function f goes
// through references the patch can redirect, and if not, why. root is
// the changed function whose callers are being followed (f itself at
// depth 0).
func (d *differ) redirectable(f *elfobj.Symbol, u *notraceUse, depth int) (string, bool) {
	return d.redirectableFrom(f, f, u, depth)
}

func (d *differ) redirectableFrom(root, f *elfobj.Symbol, u *notraceUse, depth int) (string, bool) {
	base := fmt.Sprintf("%s changed but has no __fentry__ call (%s), so ftrace cannot redirect it", f.Name, d.whyNoFentry(f))
	if depth > 0 {
		base = fmt.Sprintf("its caller %s has no __fentry__ call either", f.Name)
	}
	// What the fix author can do about it.
	advice := fmt.Sprintf("leave %s's code as it is and put the fix in a function that has a __fentry__ call", root.Name)
	if d.noFentryAtAll() {
		advice = "no function of this file can be redirected, so the fix cannot be live-patched: it takes a reboot into the fixed kernel, or a fix to a caller in a file built with ftrace instrumentation"
	}
	if u == nil {
		u = &notraceUse{}
	}
	switch {
	case depth > maxNotraceDepth:
		return fmt.Sprintf("%s, and the chain of notrace callers leading to it is longer than %d functions: %s", base, maxNotraceDepth, advice), false
	case !f.Local() && d.b.obj.Symbol("__ksymtab_"+f.Name) != nil:
		return fmt.Sprintf("%s; it is exported, so any module, loaded now or later, may call it directly, and neither the patch nor a hook can re-point direct calls in code the patch does not replace: %s", base, advice), false
	case !f.Local():
		why := fmt.Sprintf("%s; it is global, so other files of the kernel may call it directly, and the build compiles and replaces only the files the fix touches (a hook cannot re-point direct calls in code): %s", base, advice)
		if !d.noFentryAtAll() {
			why += fmt.Sprintf(", or make %s static if every caller is in its file", f.Name)
		}
		return why, false
	case len(u.stray) > 0:
		return fmt.Sprintf("%s, and %s refer%s to it from outside any function or variable: which paths reach it cannot be told; %s", base, strings.Join(u.stray, ", "), plural(len(u.stray), "", "s"), advice), false
	case len(u.address) > 0:
		return fmt.Sprintf("%s, and %s take%s its address (not a call): the pointer may be stored anywhere (a callback registered with another subsystem), where neither the patch nor a hook can find every copy: %s", base, strings.Join(u.address, ", "), plural(len(u.address), "", "s"), advice), false
	case len(u.roData) > 0:
		return fmt.Sprintf("%s, and read-only data points to it (%s): neither the patch nor a hook can re-point an entry of a table the kernel has made read-only: %s", base, strings.Join(u.roData, ", "), advice), false
	case len(u.initCall) > 0:
		return fmt.Sprintf("%s, and init or exit code calls it (%s), which the patch cannot replace: %s", base, strings.Join(u.initCall, ", "), advice), false
	case len(u.callers) == 0 && len(u.data) == 0:
		return fmt.Sprintf("%s, and nothing in the object refers to it, so no caller can be replaced to reach a new copy: %s", base, advice), false
	}
	for _, c := range u.callers {
		if p := coldParent(c.Name); p != "" {
			c = d.b.obj.Symbol(p)
			if c == nil {
				return fmt.Sprintf("%s, and its caller %s is a split-out part whose parent is not in the object", base, p), false
			}
		}
		if !hasFentry(c) && !c.Local() {
			// Its own refusal says why; this one names the chain.
			why, _ := d.redirectableFrom(root, c, nil, depth+1)
			return fmt.Sprintf("%s; the patch would replace its callers to call a new copy, but %s", base, why), false
		}
	}
	return "", true
}

// noFentryAtAll tells whether the object was built without ftrace
// instrumentation: no function of it calls __fentry__.
func (d *differ) noFentryAtAll() bool { return d.b.obj.Symbol("__fentry__") == nil }

// whyNoFentry says why a function has no __fentry__ call: its object
// has none at all (built without -pg), or it is notrace.
func (d *differ) whyNoFentry(f *elfobj.Symbol) string {
	if d.noFentryAtAll() {
		return "its file is built without ftrace instrumentation (its Makefile removes the tracing flags, as for all of kernel/trace/ and parts of lib/), so no function of it has one"
	}
	return "notrace, as the kernel's inline functions are, or built without ftrace instrumentation"
}

// refuseNotrace replaces the generic refusal of f with a specific one.
func (d *differ) refuseNotrace(f *elfobj.Symbol, kind, reason string) {
	d.res.Unsafe = slices.DeleteFunc(d.res.Unsafe, func(p Problem) bool { return p.Kind == KindNoFentry && p.Symbol == f.Name })
	d.res.unsafe(kind, f.Name, reason)
}

// usesOf finds, for every function of the object, how the object
// reaches it (see notraceUse). Debugging information and the tables that
// locate places in code for the kernel (bug table, jump labels, ...) do
// not reach a function: they are left out.
func usesOf(o *elfobj.Object, lay *layout.Layout) map[*elfobj.Symbol]*notraceUse {
	m := map[*elfobj.Symbol]*notraceUse{}
	get := func(t *elfobj.Symbol) *notraceUse {
		if m[t] == nil {
			m[t] = &notraceUse{}
		}
		return m[t]
	}
	for _, sec := range o.Sections {
		if sec == nil || !sec.Alloc() || len(sec.Relocs) == 0 || siteTable(lay, sec.Name) {
			continue
		}
		for _, r := range sec.Relocs {
			t, off := r.Target()
			if t == nil || t.Type != elf.STT_FUNC || !t.Defined() {
				continue
			}
			from := sec.SymbolAt(r.Offset)
			call := sec.Executable() && directCall(sec, r) && off == -4
			switch {
			case from == t && call:
				continue // recursion: the copy calls itself
			case from != nil && coldParent(from.Name) == t.Name:
				continue // its split-out part jumps back into it
			case !sec.Executable() && off != 0:
				continue // a place inside it (its own jump table), not a pointer to it
			}
			u := get(t)
			switch {
			case from == nil:
				if !slices.Contains(u.stray, sec.Name) {
					u.stray = append(u.stray, sec.Name)
				}
			case call:
				switch {
				case isInit(from):
					u.initCall = appendName(u.initCall, from.Name)
				case !slices.Contains(u.callers, from):
					u.callers = append(u.callers, from)
				}
			case sec.Executable():
				u.address = appendName(u.address, from.Name)
			case readOnly(sec):
				u.roData = appendName(u.roData, from.Name+" in "+sec.Name)
			case !slices.Contains(u.data, from):
				u.data = append(u.data, from)
			}
		}
	}
	return m
}

// directCall tells whether a relocation is the displacement of a call,
// jmp or jcc with a 32-bit displacement. A RIP-relative operand (lea, mov)
// has a ModRM byte of the form 00xxx101 before its displacement, never
// these opcodes, so the byte before tells them apart.
func directCall(sec *elfobj.Section, r elfobj.Reloc) bool {
	if r.Type != elf.R_X86_64_PLT32 && r.Type != elf.R_X86_64_PC32 {
		return false
	}
	o := r.Offset
	if o < 1 || o > uint64(len(sec.Data)) {
		return false
	}
	switch b := sec.Data[o-1]; {
	case b == 0xe8 || b == 0xe9:
		return true
	case b >= 0x80 && b <= 0x8f:
		return o >= 2 && sec.Data[o-2] == 0x0f
	}
	return false
}

// siteTable tells whether a section only locates places in code, or is
// discarded at link time: nothing there calls or stores a function.
func siteTable(lay *layout.Layout, name string) bool {
	if _, ok := lay.Section(name); ok || layout.Objtool(name) || strings.HasPrefix(name, ".discard") {
		return true
	}
	switch name {
	case "__patchable_function_entries", ".eh_frame":
		return true
	}
	return false
}

// readOnly tells whether data in sec cannot be written once the kernel
// runs: constants, and data made read-only after init.
func readOnly(sec *elfobj.Section) bool {
	return sec.Flags&elf.SHF_WRITE == 0 || strings.Contains(sec.Name, "..ro_after_init")
}

func appendName(list []string, n string) []string {
	if slices.Contains(list, n) {
		return list
	}
	return append(list, n)
}

func plural(n int, many, one string) string {
	if n == 1 {
		return one
	}
	return many
}

func them(n int) string { return plural(n, "them", "it") }
