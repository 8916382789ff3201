package livepatch

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/stitchpatch/stitch/internal/fingerprint"
)

// ErrWrongKernel means a patch was not built for the running kernel: its
// build-id differs, or the code it replaces is not the code running.
var ErrWrongKernel = errors.New("patch not built for the running kernel")

// CodeCheck is a function whose running code must be the code a patch was
// built against (Ksplice's run-pre matching, repeated on the target).
type CodeCheck struct {
	Object      string // "vmlinux" or a module name
	Name        string
	Sympos      int
	Fingerprint fingerprint.Fingerprint
}

// CheckResult is what VerifyCode found for one function.
type CheckResult struct {
	Object  string `json:"object"`
	Name    string `json:"name"`
	Address string `json:"address,omitempty"`
	// Checked is false for a function of a module that is not loaded:
	// livepatch patches it when it loads; its code cannot be read now.
	Checked bool   `json:"checked"`
	Error   string `json:"error,omitempty"`
}

// VerifyCode compares each function's running code, read through
// /proc/kallsyms and /proc/kcore, with its fingerprint. Code the kernel
// rewrote at boot (fentry, alternatives, jump labels, ...) and resolved
// relocations are masked by the fingerprint.
func (k *Kernel) VerifyCode(checks []CodeCheck) ([]CheckResult, error) {
	syms, err := k.kallsyms()
	if err != nil {
		return nil, err
	}
	kc, err := k.OpenKcore()
	if err != nil {
		return nil, err
	}
	defer kc.Close()
	var results []CheckResult
	var bad []string
	for _, c := range checks {
		r := CheckResult{Object: c.Object, Name: c.Name}
		addr, size, err := syms.find(c.Object, c.Name, c.Sympos)
		switch {
		case errors.Is(err, errNotLoaded):
			results = append(results, r)
			continue
		case err == nil:
			r.Address = fmt.Sprintf("%#x", addr)
			var code []byte
			if code, err = kc.Read(addr, int(size)); err == nil {
				err = c.Fingerprint.MatchPadded(code)
			}
		}
		r.Checked = true
		if err != nil {
			r.Error = err.Error()
			bad = append(bad, fmt.Sprintf("%s:%s: %v", c.Object, c.Name, err))
		}
		results = append(results, r)
	}
	if len(bad) > 0 {
		return results, fmt.Errorf("%w: %s", ErrWrongKernel, strings.Join(bad, "; "))
	}
	return results, nil
}

var errNotLoaded = errors.New("module not loaded")

// kallsymsTable is /proc/kallsyms: symbols in kallsyms order, the order
// livepatch's sympos counts.
type kallsymsTable struct {
	syms []ksym
}

type ksym struct {
	addr   uint64
	name   string
	object string
}

func (k *Kernel) kallsyms() (*kallsymsTable, error) {
	f, err := os.Open(k.path("/proc/kallsyms"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	t := &kallsymsTable{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 3 {
			continue
		}
		addr, err := strconv.ParseUint(fs[0], 16, 64)
		if err != nil {
			return nil, fmt.Errorf("/proc/kallsyms: bad line %q", sc.Text())
		}
		obj := "vmlinux"
		if len(fs) == 4 {
			obj = strings.Trim(fs[3], "[]")
		}
		t.syms = append(t.syms, ksym{addr: addr, name: fs[2], object: obj})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(t.syms) > 0 && t.syms[len(t.syms)/2].addr == 0 {
		return nil, fmt.Errorf("%w: /proc/kallsyms shows no addresses (run as root)", ErrNotRoot)
	}
	return t, nil
}

// find returns the address of the sympos'th symbol name of object (0:
// the only one) and the distance to the next symbol, an upper bound of
// its size.
func (t *kallsymsTable) find(object, name string, sympos int) (uint64, uint64, error) {
	n, loaded := 0, false
	for i, s := range t.syms {
		if s.object != object {
			continue
		}
		loaded = true
		if s.name != name {
			continue
		}
		n++
		if sympos != 0 && n != sympos {
			continue
		}
		for j := i + 1; j < len(t.syms); j++ {
			if t.syms[j].addr > s.addr {
				return s.addr, t.syms[j].addr - s.addr, nil
			}
		}
		return 0, 0, fmt.Errorf("%s: last symbol, size unknown", name)
	}
	if !loaded && object != "vmlinux" {
		return 0, 0, errNotLoaded
	}
	return 0, 0, fmt.Errorf("%s,%d not found in %s", name, sympos, object)
}
