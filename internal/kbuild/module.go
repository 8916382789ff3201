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

// HeadersDir is where Debian's linux-headers package for release lives.
func HeadersDir(release string) string {
	return "/usr/src/linux-headers-" + release
}

// BuildModule builds the external module name (its Kbuild file in dir
// says `obj-m := name.o`) against the headers tree and returns the path
// of name.ko. kbuild's output goes to progress as it runs; on failure the
// error quotes the compiler's last lines.
func BuildModule(ctx context.Context, headers, dir, name string, progress io.Writer) (string, error) {
	if _, err := os.Stat(filepath.Join(headers, "Makefile")); err != nil {
		return "", fmt.Errorf("%w: %s (install the linux-headers package of the target kernel)", ErrNoHeaders, headers)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	if progress == nil {
		progress = io.Discard
	}
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, "make", "-C", headers, "M="+abs, "modules")
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
