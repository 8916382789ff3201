package kallsyms

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// ParseProc reads a /proc/kallsyms listing: "ADDR TYPE NAME [MODULE]".
// Symbols without a module column belong to Vmlinux. Sizes come from the
// next higher address in the same object (there are no section bounds to
// go by, so each object's last symbol has size 0). Read as a non-root
// user, all addresses are 0 and so are the sizes.
func ParseProc(r io.Reader) (*Table, error) {
	var syms []Symbol
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 || len(f) > 4 || len(f[1]) != 1 || !typeLetterValid(f[1][0]) {
			return nil, fmt.Errorf("%w: kallsyms line %d: %q", ErrFormat, n, line)
		}
		addr, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil {
			return nil, fmt.Errorf("%w: kallsyms line %d: address %q", ErrFormat, n, f[0])
		}
		obj := Vmlinux
		if len(f) == 4 {
			m, ok := strings.CutPrefix(f[3], "[")
			m, ok2 := strings.CutSuffix(m, "]")
			if !ok || !ok2 || m == "" {
				return nil, fmt.Errorf("%w: kallsyms line %d: module column %q", ErrFormat, n, f[3])
			}
			obj = m
		}
		syms = append(syms, Symbol{Name: f[2], Type: f[1][0], Addr: addr, Object: obj})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read kallsyms: %w", err)
	}
	fillSizes(syms, nil)
	return newTable(syms), nil
}
