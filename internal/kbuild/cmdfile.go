package kbuild

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ErrCmdFile means kbuild's command file for an object is missing or
// does not say where the object goes.
var ErrCmdFile = errors.New("kbuild command file")

// Vmlinux is the object a built-in object is linked into, as livepatch
// names it.
const Vmlinux = "vmlinux"

// ObjectFacts are what kbuild recorded when it compiled an object: the
// command line in the object's .NAME.o.cmd file says whether the object
// was compiled for a module and which module it is part of. 6.1's kbuild
// (scripts/Makefile.lib) passes
//
//	modular:  -DMODULE -DKBUILD_MODNAME='"xfs"'    (fs/xfs/xfs_iops.o, in xfs.ko)
//	built-in: -DKBUILD_MODFILE='"fs/proc/proc"' -DKBUILD_MODNAME='"proc"'
//
// KBUILD_MODNAME is the composite module the object is linked into (its
// file name with '-' and ',' made '_', which is the module's name), or
// the names of several joined by ':' for an object shared by several.
type ObjectFacts struct {
	Object string `json:"object"` // relative to the tree: fs/proc/version.o
	// Module: compiled with -DMODULE, so linked into the modules in
	// ModNames; otherwise built into vmlinux.
	Module   bool     `json:"module"`
	ModNames []string `json:"modnames"`
	// ModFile is KBUILD_MODFILE, given to built-in objects: the path of
	// the module (without .ko) the code would be if it were modular.
	ModFile string `json:"modfile,omitempty"`
}

// Objects names the livepatch objects the object is linked into:
// vmlinux, or its modules.
func (f ObjectFacts) Objects() []string {
	if !f.Module {
		return []string{Vmlinux}
	}
	return append([]string(nil), f.ModNames...)
}

// String says where the object goes, for messages.
func (f ObjectFacts) String() string {
	if !f.Module {
		return fmt.Sprintf("%s is built into vmlinux (KBUILD_MODFILE %q)", f.Object, f.ModFile)
	}
	return fmt.Sprintf("%s is compiled for module %s (-DMODULE)", f.Object, strings.Join(f.ModNames, ", "))
}

// CmdFile is the path of the command file kbuild writes for object
// relpath: fs/proc/version.o -> fs/proc/.version.o.cmd.
func CmdFile(relpath string) string {
	return filepath.Join(filepath.Dir(relpath), "."+filepath.Base(relpath)+".cmd")
}

// ObjectFacts reads the facts kbuild recorded for object relpath (like
// fs/proc/version.o) when it last compiled it; compile it first. The
// tree's lock is held while reading, so that no compilation rewrites the
// file meanwhile.
func (t *Tree) ObjectFacts(ctx context.Context, relpath string) (ObjectFacts, error) {
	if !strings.HasSuffix(relpath, ".o") || filepath.IsAbs(relpath) || strings.Contains(relpath, "..") {
		return ObjectFacts{}, fmt.Errorf("%w: want a relative path to an object, like fs/proc/version.o, not %q", ErrCmdFile, relpath)
	}
	unlock, err := t.lock(ctx)
	if err != nil {
		return ObjectFacts{}, err
	}
	defer unlock()
	path := filepath.Join(t.Dir, CmdFile(relpath))
	b, err := os.ReadFile(path)
	if err != nil {
		return ObjectFacts{}, fmt.Errorf("%w: %w (compile %s in the tree first)", ErrCmdFile, err, relpath)
	}
	f, err := ParseCmdFile(b, relpath)
	if err != nil {
		return ObjectFacts{}, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// ParseCmdFile reads the facts of object relpath from the contents of
// its .cmd file: the line "cmd_<relpath> := <command>" (6.1) or
// "savedcmd_<relpath> := <command>" (6.12; kbuild renamed it in 6.3),
// whose first command compiles the object.
func ParseCmdFile(data []byte, relpath string) (ObjectFacts, error) {
	prefix := "cmd_" + relpath + " := "
	var cmd string
	found := false
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20) // a compiler command line is a few KiB
	for sc.Scan() {
		line := strings.TrimPrefix(sc.Text(), "saved")
		if rest, ok := strings.CutPrefix(line, prefix); ok {
			cmd, found = rest, true
			break
		}
	}
	if err := sc.Err(); err != nil {
		return ObjectFacts{}, fmt.Errorf("%w: %v", ErrCmdFile, err)
	}
	if !found {
		return ObjectFacts{}, fmt.Errorf("%w: no %q line: not kbuild's command file for %s", ErrCmdFile, strings.TrimSpace(prefix), relpath)
	}
	words, err := shellWords(unescapeMake(cmd))
	if err != nil {
		return ObjectFacts{}, fmt.Errorf("%w: command of %s: %v", ErrCmdFile, relpath, err)
	}
	f := ObjectFacts{Object: relpath}
	var modname string
	haveName, output := false, false
	for i, w := range words {
		switch {
		case w == "-o" && i+1 < len(words):
			output = output || words[i+1] == relpath
		case w == "-DMODULE":
			f.Module = true
		case strings.HasPrefix(w, "-DKBUILD_MODNAME="):
			if modname, err = cString(strings.TrimPrefix(w, "-DKBUILD_MODNAME=")); err != nil {
				return ObjectFacts{}, fmt.Errorf("%w: KBUILD_MODNAME of %s: %v", ErrCmdFile, relpath, err)
			}
			haveName = true
		case strings.HasPrefix(w, "-DKBUILD_MODFILE="):
			if f.ModFile, err = cString(strings.TrimPrefix(w, "-DKBUILD_MODFILE=")); err != nil {
				return ObjectFacts{}, fmt.Errorf("%w: KBUILD_MODFILE of %s: %v", ErrCmdFile, relpath, err)
			}
		}
	}
	if !output {
		return ObjectFacts{}, fmt.Errorf("%w: the command does not compile %s (no -o %s before the first ';')", ErrCmdFile, relpath, relpath)
	}
	if !haveName {
		return ObjectFacts{}, fmt.Errorf("%w: the command compiling %s has no -DKBUILD_MODNAME: not compiled by kbuild's C rule", ErrCmdFile, relpath)
	}
	for _, n := range strings.Split(modname, ":") {
		if !modName(n) {
			return ObjectFacts{}, fmt.Errorf("%w: KBUILD_MODNAME of %s is %q: not a module name (letters, digits, '_'; several joined by ':')", ErrCmdFile, relpath, modname)
		}
		f.ModNames = append(f.ModNames, n)
	}
	return f, nil
}

// modName tells whether s can be a module's name as kbuild passes it.
func modName(s string) bool {
	if s == "" || len(s) > 55 { // MODULE_NAME_LEN - 1 on 64-bit
		return false
	}
	for _, c := range s {
		if !(c == '_' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// cString takes the value of a macro kbuild defines as a C string
// literal ("proc"); kbuild's names have no escapes.
func cString(v string) (string, error) {
	if len(v) < 2 || v[0] != '"' || v[len(v)-1] != '"' || strings.ContainsAny(v[1:len(v)-1], `"\`) {
		return "", fmt.Errorf("%q is not a plain C string literal", v)
	}
	return v[1 : len(v)-1], nil
}

// unescapeMake undoes what kbuild does to a command to store it in a make
// variable: "$$" for "$" and "\#" for "#".
func unescapeMake(s string) string {
	return strings.NewReplacer("$$", "$", `\#`, "#").Replace(s)
}

// shellWords splits the first command of a shell command line into
// words, as sh would: quotes and backslashes are removed, and the words
// end at the first unquoted ';', '&' or '|'.
func shellWords(s string) ([]string, error) {
	var words []string
	var w strings.Builder
	inWord := false
	end := func() {
		if inWord {
			words = append(words, w.String())
			w.Reset()
			inWord = false
		}
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n':
			end()
		case c == ';' || c == '&' || c == '|':
			end()
			return words, nil
		case c == '\\':
			if i+1 < len(s) {
				i++
				w.WriteByte(s[i])
			}
			inWord = true
		case c == '\'':
			j := strings.IndexByte(s[i+1:], '\'')
			if j < 0 {
				return nil, fmt.Errorf("unterminated ' at byte %d", i)
			}
			w.WriteString(s[i+1 : i+1+j])
			i += j + 1
			inWord = true
		case c == '"':
			i++
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) && strings.IndexByte("\"\\$`", s[i+1]) >= 0 {
					i++
				}
				w.WriteByte(s[i])
			}
			if i >= len(s) {
				return nil, fmt.Errorf("unterminated \" in the command")
			}
			inWord = true
		default:
			w.WriteByte(c)
			inWord = true
		}
	}
	end()
	return words, nil
}
