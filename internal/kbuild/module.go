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
	if _, err := os.Stat(filepath.Join(headers, "Makefile")); err != nil {
		return "", fmt.Errorf("%w: %s (`stitch kernel add RELEASE` fetches the headers of a kernel)", ErrNoHeaders, headers)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	if progress == nil {
		progress = io.Discard
	}
	var out bytes.Buffer
	args := append([]string{"-C", headers, "M=" + abs}, makeVars...)
	cmd := exec.CommandContext(ctx, "make", append(args, "modules")...)
	cmd.Stdout = io.MultiWriter(&out, progress)
	cmd.Stderr = cmd.Stdout
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build module %s in %s: %w\n%s", name, dir, err, lastLines(out.String(), 20))
	}
	ko := filepath.Join(abs, name+".ko")
	if _, err := os.Stat(ko); err != nil {
		return "", fmt.Errorf("build module %s: kbuild succeeded but made no %s", name, ko)
	}
	return ko, nil
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
