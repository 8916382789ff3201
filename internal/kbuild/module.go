package kbuild

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ErrNoHeaders means the linux-headers tree for a release is missing.
var ErrNoHeaders = errors.New("kernel headers not installed")

// BuildModule builds the external module name (its Kbuild file in dir
// says `obj-m := name.o`) against the headers tree and returns the path
// of name.ko. makeVars are extra make variables (e.g.
// KBUILD_MODPOST_WARN=1). kbuild's output goes to progress as it runs; on
// failure the error quotes the compiler's last lines.
func BuildModule(ctx context.Context, headers, dir, name string, progress io.Writer, makeVars ...string) (string, error) {
	abs, out, err := makeExternal(ctx, headers, dir, progress, append(makeVars, "modules")...)
	if err != nil {
		return "", fmt.Errorf("build module %s in %s: %w%s", name, dir, err, out)
	}
	ko := filepath.Join(abs, name+".ko")
	if _, err := os.Stat(ko); err != nil {
		return "", fmt.Errorf("build module %s: kbuild succeeded but made no %s", name, ko)
	}
	return ko, nil
}

// makeExternal runs kbuild for the external module in dir against the
// headers tree with targets (and make variables), streaming its output to
// progress. It returns dir's absolute path and, on failure, the output's
// last lines on lines of their own.
func makeExternal(ctx context.Context, headers, dir string, progress io.Writer, targets ...string) (abs, tail string, err error) {
	if _, err := os.Stat(filepath.Join(headers, "Makefile")); err != nil {
		return "", "", fmt.Errorf("%w: %s (`stitch kernel add RELEASE` fetches the headers of a kernel)", ErrNoHeaders, headers)
	}
	if abs, err = filepath.Abs(dir); err != nil {
		return "", "", err
	}
	if progress == nil {
		progress = io.Discard
	}
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, "make", append([]string{"-C", headers, "M=" + abs}, targets...)...)
	cmd.Stdout = io.MultiWriter(&out, progress)
	cmd.Stderr = cmd.Stdout
	if err := cmd.Run(); err != nil {
		return abs, "\n" + lastLines(out.String(), 20), err
	}
	return abs, "", nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Export is where one exported symbol comes from.
type Export struct {
	Module string // "vmlinux" for the kernel itself
	// Namespace is the symbol namespace (EXPORT_SYMBOL_NS): a module
	// using the symbol must import it, or modpost refuses the module.
	Namespace string
}

// Symvers maps each symbol the kernel exports to where it comes from,
// from a Module.symvers file.
type Symvers map[string]Export

// ReadSymvers reads the Module.symvers of a headers tree: lines of
// "crc<TAB>symbol<TAB>module<TAB>export type<TAB>namespace".
func ReadSymvers(headers string) (Symvers, error) {
	path := filepath.Join(headers, "Module.symvers")
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoHeaders, err)
	}
	sv := Symvers{}
	for i, line := range strings.Split(string(b), "\n") {
		if line == "" {
			continue
		}
		f := strings.Split(line, "\t")
		if len(f) < 3 {
			return nil, fmt.Errorf("%s:%d: malformed line %q", path, i+1, line)
		}
		e := Export{Module: f[2]}
		if len(f) > 4 {
			e.Namespace = f[4]
		}
		sv[f[1]] = e
	}
	return sv, nil
}

// CompileModuleObject compiles one object (obj, like hooks.o, relative
// to dir) of the external module in dir against the headers tree, as
// kbuild would for the module, and returns its path.
func CompileModuleObject(ctx context.Context, headers, dir, obj string, progress io.Writer) (string, error) {
	abs, out, err := makeExternal(ctx, headers, dir, progress, obj)
	if errors.Is(err, ErrNoHeaders) {
		return "", err
	}
	if err != nil {
		return "", fmt.Errorf("%w: compile %s in %s: %w%s", ErrBuild, obj, dir, err, out)
	}
	path := filepath.Join(abs, obj)
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("%w: compile %s: kbuild succeeded but made no %s", ErrBuild, obj, path)
	}
	return path, nil
}
