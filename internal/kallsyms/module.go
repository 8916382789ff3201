package kallsyms

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"

	"github.com/stitchpatch/stitch/internal/kmod"
)

// Module is the symbols of one module .ko file. Its Table's addresses are
// offsets in each symbol's section (a .ko is not linked yet) and sizes
// are the symbols' st_size.
type Module struct {
	Name  string // modinfo name=, the kernel's name for it
	Path  string
	Table *Table
	data  []byte
	f     *elf.File
	shndx []elf.SectionIndex // per symbol of Table
	// loading names the symbols the module has only while it loads
	// (init code and data), which its kallsyms lists until init ends.
	loading map[string]bool
}

// Shadowed tells whether the module has a symbol called name in init code
// or data. Livepatch looks module symbols up when the module comes (if the
// patch is loaded first), when those are still listed, or once it is live,
// when they are gone: the same name counts differently then, so a sympos
// (or the uniqueness that sympos 0 needs) cannot be trusted for it.
func (m *Module) Shadowed(name string) bool { return m.loading[name] }

// ReadModule reads the symbols of a .ko file (or a .ko.xz, as 6.12's
// packages ship them). It keeps the symbols the
// loaded module keeps in its kallsyms (kernel/module/kallsyms.c,
// is_core_symbol with CONFIG_KALLSYMS_ALL): named, defined in an
// allocated section that is not init code or data, in symbol-table
// order. That order and filter give livepatch's sympos for the module.
func ReadModule(path string) (*Module, error) {
	data, err := readKo(path)
	if err != nil {
		return nil, err
	}
	m, err := readModule(data, true)
	if err != nil {
		return nil, fmt.Errorf("module symbols of %s: %w", path, err)
	}
	m.Path = path
	return m, nil
}

func readModule(data []byte, keep bool) (m *Module, err error) {
	defer recoverInto(&err)
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrFormat, err)
	}
	m = &Module{f: f, loading: map[string]bool{}}
	if keep {
		m.data = data
	}
	if s := f.Section(".modinfo"); s != nil {
		if info, err := s.Data(); err == nil {
			if v := kmod.ParseModinfo(info)["name"]; len(v) > 0 {
				m.Name = v[0]
			}
		}
	}
	if m.Name == "" {
		return nil, fmt.Errorf("%w: no modinfo name (not a kernel module?)", ErrFormat)
	}
	esyms, err := f.Symbols()
	if err != nil && !errors.Is(err, elf.ErrNoSymbols) {
		return nil, fmt.Errorf("%w: %v", ErrFormat, err)
	}
	exported := map[string]bool{}
	for _, s := range esyms {
		if n, ok := strings.CutPrefix(s.Name, "__ksymtab_"); ok {
			exported[n] = true
		}
	}
	var syms []Symbol
	for _, s := range esyms {
		if s.Name == "" || s.Section == elf.SHN_UNDEF || int(s.Section) >= len(f.Sections) {
			continue
		}
		sec := f.Sections[s.Section]
		if strings.HasPrefix(sec.Name, ".init") {
			m.loading[s.Name] = true
			continue
		}
		// The loader drops SHF_ALLOC from .modinfo and __versions.
		if sec.Flags&elf.SHF_ALLOC == 0 || sec.Name == ".modinfo" || sec.Name == "__versions" {
			continue
		}
		typ := moduleType(s, sec)
		if exported[s.Name] && typ >= 'a' && typ <= 'z' {
			typ -= 'a' - 'A' // /proc/kallsyms capitalizes exported module symbols
		}
		syms = append(syms, Symbol{Name: s.Name, Type: typ, Addr: s.Value, Size: s.Size, Object: m.Name})
		m.shndx = append(m.shndx, s.Section)
	}
	m.Table = newTable(syms)
	return m, nil
}

// moduleType is the kernel's type letter for a module symbol (elf_type in
// kernel/module/kallsyms.c), before exported ones are capitalized.
func moduleType(s elf.Symbol, sec *elf.Section) byte {
	switch {
	case elf.ST_BIND(s.Info) == elf.STB_WEAK && elf.ST_TYPE(s.Info) == elf.STT_OBJECT:
		return 'v'
	case elf.ST_BIND(s.Info) == elf.STB_WEAK:
		return 'w'
	case sec.Name == ".data..percpu":
		return 'a'
	case sec.Flags&elf.SHF_EXECINSTR != 0:
		return 't'
	case sec.Type == elf.SHT_NOBITS:
		return 'b'
	case sec.Flags&elf.SHF_WRITE == 0:
		return 'r'
	}
	return 'd'
}

// Bytes returns the contents of the module symbol name (sympos as
// livepatch takes it) from its section, and the symbol.
func (m *Module) Bytes(name string, sympos int) ([]byte, Symbol, error) {
	s, err := m.Table.Find(m.Name, name, sympos)
	if err != nil {
		return nil, Symbol{}, err
	}
	if m.data == nil {
		return nil, s, fmt.Errorf("bytes of %s: module read without its contents", name)
	}
	i := m.Table.indices(m.Name, name)[s.Sympos-1]
	sec := m.f.Sections[m.shndx[i]]
	if sec.Type == elf.SHT_NOBITS || s.Addr > sec.Size || s.Size > sec.Size-s.Addr || sec.Offset+sec.Size > uint64(len(m.data)) {
		return nil, s, fmt.Errorf("%w: %s has no contents in %s of %s", ErrNotFound, name, sec.Name, m.Name)
	}
	off := sec.Offset + s.Addr
	return m.data[off : off+s.Size : off+s.Size], s, nil
}

// Modules finds the module .ko files of one kernel release
// (/lib/modules/<release>) by the functions they define. The index of
// every module's function names is built on first use (a few seconds for
// Debian's ~4000 modules) and kept for the Modules' lifetime.
type Modules struct {
	dir string
	log *slog.Logger

	once  sync.Once
	err   error
	paths map[string]string   // module name -> .ko path
	funcs map[string][]string // function name -> module names
	// builtin maps the modules built into the kernel (modules.builtin)
	// to their paths there.
	builtin map[string]string
}

// NewModules indexes the modules under dir (/lib/modules/<release>).
func NewModules(dir string, log *slog.Logger) *Modules {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Modules{dir: dir, log: log}
}

// Path returns the .ko file of the module called name.
func (ms *Modules) Path(ctx context.Context, name string) (string, error) {
	if err := ms.load(ctx); err != nil {
		return "", err
	}
	p, ok := ms.paths[name]
	if !ok {
		return "", fmt.Errorf("%w: no module %s under %s", ErrNotFound, name, ms.dir)
	}
	return p, nil
}

// Open reads the module called name.
func (ms *Modules) Open(ctx context.Context, name string) (*Module, error) {
	p, err := ms.Path(ctx, name)
	if err != nil {
		return nil, err
	}
	return ReadModule(p)
}

// Builtin tells whether the kernel has the module called name built in,
// by its modules.builtin (paths like kernel/fs/ext4/ext4.ko), and where
// the module would be. Without that file, nothing is known built in.
func (ms *Modules) Builtin(ctx context.Context, name string) (path string, ok bool, err error) {
	if err := ms.load(ctx); err != nil {
		return "", false, err
	}
	path, ok = ms.builtin[name]
	return path, ok, nil
}

// Defining returns the modules that define a function called fn.
func (ms *Modules) Defining(ctx context.Context, fn string) ([]string, error) {
	if err := ms.load(ctx); err != nil {
		return nil, err
	}
	return ms.funcs[fn], nil
}

func (ms *Modules) load(ctx context.Context) error {
	ms.once.Do(func() { ms.err = ms.index(ctx) })
	return ms.err
}

func (ms *Modules) index(ctx context.Context) error {
	var files []string
	root := filepath.Join(ms.dir, "kernel")
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && isModuleFile(p) {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("index modules: %w", err)
	}
	type result struct {
		path, name string
		funcs      []string
		err        error
	}
	results := make([]result, len(files))
	work := make(chan int)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				results[i] = indexModule(files[i])
			}
		}()
	}
feed:
	for i := range files {
		select {
		case work <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("index modules: %w", err)
	}
	ms.paths = make(map[string]string, len(files))
	ms.funcs = map[string][]string{}
	for _, r := range results {
		if r.err != nil {
			ms.log.Warn("module not indexed", "path", r.path, "err", r.err)
			continue
		}
		ms.paths[r.name] = r.path
		for _, fn := range r.funcs {
			ms.funcs[fn] = append(ms.funcs[fn], r.name)
		}
	}
	b, err := os.ReadFile(filepath.Join(ms.dir, "modules.builtin"))
	switch {
	case err == nil:
		ms.builtin = map[string]string{}
		for _, p := range strings.Fields(string(b)) {
			ms.builtin[kmod.ModuleName(p)] = p
		}
	case !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("index modules: %w", err)
	}
	ms.log.Info("indexed modules", "dir", ms.dir, "modules", len(ms.paths), "functions", len(ms.funcs), "builtin", len(ms.builtin))
	return nil
}

// isModuleFile tells whether a file under /lib/modules is a module.
func isModuleFile(p string) bool {
	return strings.HasSuffix(p, ".ko") || strings.HasSuffix(p, ".ko.xz")
}

// readKo reads a module file, decompressing a .ko.xz.
func readKo(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read module: %w", err)
	}
	if !strings.HasSuffix(path, ".xz") {
		return data, nil
	}
	// Modules are a few MiB at most; 8 times the compressed size is a
	// generous first buffer.
	if data, err = unxz(data, 8*len(data)); err != nil {
		return nil, fmt.Errorf("decompress module %s: %w", path, err)
	}
	return data, nil
}

func indexModule(path string) (r struct {
	path, name string
	funcs      []string
	err        error
}) {
	r.path = path
	data, err := readKo(path)
	if err != nil {
		r.err = err
		return r
	}
	m, err := readModule(data, false)
	if err != nil {
		r.err = err
		return r
	}
	r.name = m.Name
	seen := map[string]bool{}
	for _, s := range m.Table.syms {
		if s.IsText() && !seen[s.Name] {
			seen[s.Name] = true
			r.funcs = append(r.funcs, s.Name)
		}
	}
	return r
}

// Location is where the functions of a compiled object live in a kernel.
type Location struct {
	Object  string   `json:"object"`         // Vmlinux or a module name
	Path    string   `json:"path,omitempty"` // the module's .ko
	Missing []string `json:"missing,omitempty"`
}

// FindObject tells which object of the kernel (vmlinux, or a module)
// holds the functions funcs, the names defined by one compiled source
// file. The object that defines the most of them wins; an object that
// defines none, or a tie, is an error. Names the winner lacks are
// reported in Missing (functions a build can drop, such as unused
// static inlines, are why this is not an error).
//
// Names are all it goes by, so a name other objects define too (a
// static show or probe) can make it ambiguous: the build does not use
// it, but locates a compiled object by kbuild's facts (build.Kernel.Locate).
func FindObject(ctx context.Context, vmlinux *Table, mods *Modules, funcs []string) (Location, error) {
	if len(funcs) == 0 {
		return Location{}, fmt.Errorf("find object: no function names")
	}
	count := map[string]int{}
	for _, fn := range funcs {
		if hasText(vmlinux, Vmlinux, fn) {
			count[Vmlinux]++
		}
		if mods == nil {
			continue
		}
		in, err := mods.Defining(ctx, fn)
		if err != nil {
			return Location{}, fmt.Errorf("find object: %w", err)
		}
		for _, m := range in {
			count[m]++
		}
	}
	var best []string
	most := 0
	for obj, n := range count {
		switch {
		case n > most:
			best, most = []string{obj}, n
		case n == most:
			best = append(best, obj)
		}
	}
	slices.Sort(best)
	switch {
	case most == 0:
		return Location{}, fmt.Errorf("%w: none of %s is in vmlinux or a module", ErrNotFound, strings.Join(head(funcs, 5), ", "))
	case len(best) > 1:
		return Location{}, fmt.Errorf("%w: %d of the functions are in each of %s", ErrAmbiguous, most, strings.Join(best, ", "))
	}
	loc := Location{Object: best[0]}
	if loc.Object != Vmlinux {
		p, err := mods.Path(ctx, loc.Object)
		if err != nil {
			return Location{}, err
		}
		loc.Path = p
	}
	for _, fn := range funcs {
		if loc.Object == Vmlinux && !hasText(vmlinux, Vmlinux, fn) ||
			loc.Object != Vmlinux && !slices.Contains(mods.funcs[fn], loc.Object) {
			loc.Missing = append(loc.Missing, fn)
		}
	}
	return loc, nil
}

func hasText(t *Table, obj, name string) bool {
	if t == nil {
		return false
	}
	for _, i := range t.indices(obj, name) {
		if t.syms[i].IsText() {
			return true
		}
	}
	return false
}

func head(s []string, n int) []string { return s[:min(n, len(s))] }
