package livepatch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/kmod"
)

// Errors a caller can test for with errors.Is.
var (
	ErrNotRoot       = errors.New("not running as root")
	ErrUnsupported   = errors.New("kernel has no livepatch support")
	ErrBusy          = errors.New("another livepatch transition is in progress")
	ErrAlreadyLoaded = errors.New("module already loaded")
	ErrUnknownPatch  = errors.New("no such livepatch")
	ErrLoad          = errors.New("kernel refused the module")
	// ErrTimeout means a transition did not finish in time. Apply rolls
	// it back; see TransitionError for what held it up.
	ErrTimeout = errors.New("transition timed out")
	// ErrKernelTrouble means the kernel warned, oopsed or locked up while
	// Apply watched it after patching; see TroubleError.
	ErrKernelTrouble = errors.New("kernel reported trouble after patching")
)

// TroubleError reports what the kernel said after a patch went in.
type TroubleError struct {
	Patch      string   `json:"patch"`
	NewTaint   string   `json:"new_taint"` // taint letters that appeared, e.g. "W"
	Log        []string `json:"log"`       // kernel log lines that tell of trouble
	RolledBack bool     `json:"rolled_back"`
}

func (e *TroubleError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "kernel trouble after applying %s", e.Patch)
	if e.NewTaint != "" {
		fmt.Fprintf(&b, " (new taint %s)", e.NewTaint)
	}
	for _, l := range e.Log {
		b.WriteString("\n    " + l)
	}
	if e.RolledBack {
		b.WriteString("\n  rolled back: the patch is disabled and its module unloaded")
	}
	return b.String()
}

func (e *TroubleError) Unwrap() error { return ErrKernelTrouble }

// Task is a task that has not reached a transition's target state yet.
type Task struct {
	PID   int      `json:"pid"`
	TGID  int      `json:"tgid"`
	Comm  string   `json:"comm"`
	Stack []string `json:"stack,omitempty"`
}

func (t Task) String() string {
	s := fmt.Sprintf("pid %d (%s)", t.PID, t.Comm)
	if len(t.Stack) > 0 {
		s += "\n      " + strings.Join(t.Stack, "\n      ")
	}
	return s
}

// TransitionError tells why a transition did not finish and what Stitch
// did about it.
type TransitionError struct {
	Patch      string        `json:"patch"`
	Enabling   bool          `json:"enabling"` // patching (true) or unpatching
	Waited     time.Duration `json:"waited_ns"`
	Holders    []Task        `json:"holders"`     // tasks still in the old state
	RolledBack bool          `json:"rolled_back"` // the kernel is as it was before the call
	Forced     bool          `json:"forced"`
}

func (e *TransitionError) Error() string {
	dir := "unpatching"
	if e.Enabling {
		dir = "patching"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s: transition not finished after %s; %d task(s) still hold it up", dir, e.Patch, e.Waited.Round(time.Millisecond), len(e.Holders))
	for _, t := range e.Holders {
		b.WriteString("\n    " + t.String())
	}
	switch {
	case e.Forced:
		b.WriteString("\n  transition FORCED complete: the module can never be unloaded")
	case e.RolledBack:
		b.WriteString("\n  rolled back: the patch is disabled and its module unloaded; the kernel is as it was")
	}
	return b.String()
}

func (e *TransitionError) Unwrap() error { return ErrTimeout }

// Progress reports a step of a load, transition or unload.
type Progress struct {
	Patch   string        `json:"patch"`
	Phase   string        `json:"phase"` // load, patching, unpatching, unload, done
	Elapsed time.Duration `json:"elapsed_ns"`
	// Pending counts tasks not yet in the target state during a transition.
	Pending int `json:"pending,omitempty"`
}

// ApplyOptions tune Apply and Revert.
type ApplyOptions struct {
	// Timeout bounds each transition; 60s if zero.
	Timeout time.Duration
	// Force, when a transition stalls, marks every task as switched
	// instead of rolling back. It breaks the consistency model and makes
	// the module impossible to unload; never the default.
	Force bool
	// Watch, if positive, keeps watching the kernel that long after the
	// transition; a new warning, oops or soft lockup reverts the patch.
	Watch time.Duration
	// Expect, if set, is checked before the module is loaded: the patch
	// must have been built for exactly the running kernel.
	Expect *Expect
	// Progress, if set, is called as the work advances.
	Progress func(Progress)
}

// Expect is what a patch's manifest says about the kernel it is for.
type Expect struct {
	Release      string
	BuildID      string
	ModuleSHA256 string // of the .ko file; empty: not checked
	Code         []CodeCheck
}

func (o ApplyOptions) timeout() time.Duration {
	if o.Timeout <= 0 {
		return 60 * time.Second
	}
	return o.Timeout
}

func (o ApplyOptions) report(p Progress) {
	if o.Progress != nil {
		o.Progress(p)
	}
}

func (k *Kernel) log() *slog.Logger {
	if k.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return k.Logger
}

func (k *Kernel) poll() time.Duration {
	if k.Poll <= 0 {
		return 100 * time.Millisecond
	}
	return k.Poll
}

// CheckModule runs every check Apply makes before it touches the kernel,
// and returns the module.
func (k *Kernel) CheckModule(path string) (*kmod.Module, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%w: loading a kernel module needs root (run with sudo)", ErrNotRoot)
	}
	if err := k.Supported(); err != nil {
		return nil, err
	}
	m, err := kmod.Open(path)
	if err != nil {
		return nil, err
	}
	if err := m.CheckLivepatch(); err != nil {
		return nil, err
	}
	rel, err := Release()
	if err != nil {
		return nil, err
	}
	if err := m.CheckRelease(rel); err != nil {
		return nil, err
	}
	if _, err := os.Stat(k.path("/sys/module/" + m.Name)); err == nil {
		return nil, fmt.Errorf("%w: %s is loaded already (revert it first: stitch revert %s)", ErrAlreadyLoaded, m.Name, m.Name)
	}
	if busy, err := k.inTransition(); err != nil {
		return nil, err
	} else if busy != "" {
		return nil, fmt.Errorf("%w: %s (wait for it, or revert it)", ErrBusy, busy)
	}
	return m, nil
}

// Apply loads the livepatch module at path and waits for its transition.
// If the transition does not finish in time it is reversed and the module
// unloaded (or, with Force, forced), and a *TransitionError is returned.
func (k *Kernel) Apply(ctx context.Context, path string, opts ApplyOptions) (*kmod.Module, error) {
	m, err := k.CheckModule(path)
	if err != nil {
		return nil, err
	}
	if opts.Expect != nil {
		opts.report(Progress{Patch: m.Name, Phase: "verify"})
		if err := k.verify(path, m, opts.Expect); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	taint, err := k.Taint()
	if err != nil {
		return nil, err
	}
	kmsg := OpenKernelLog()
	defer kmsg.Close()
	opts.report(Progress{Patch: m.Name, Phase: "load"})
	if err := k.load(path, kmsg); err != nil {
		return nil, err
	}
	k.log().Info("module loaded", "module", m.Name, "elapsed", time.Since(start))

	err = k.waitTransition(ctx, m.Name, true, opts, start)
	var te *TransitionError
	if !errors.As(err, &te) {
		if err != nil {
			return m, err
		}
		if opts.Watch > 0 {
			if err := k.watch(ctx, m.Name, taint, kmsg, opts, start); err != nil {
				return m, err
			}
		}
		opts.report(Progress{Patch: m.Name, Phase: "done", Elapsed: time.Since(start)})
		return m, nil
	}
	if opts.Force {
		k.log().Warn("forcing the livepatch transition: tasks are marked patched without a safety check", "patch", m.Name)
		if err := os.WriteFile(filepath.Join(k.patchDir(m.Name), "force"), []byte("1"), 0); err != nil {
			return m, fmt.Errorf("force %s: %w (after: %v)", m.Name, err, te)
		}
		te.Forced = true
		return m, te
	}
	// Roll back: reversing an unfinished transition is always allowed and
	// only has to move the tasks that already switched.
	k.log().Warn("transition stalled; rolling back", "patch", m.Name, "holders", len(te.Holders))
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), opts.timeout())
	defer cancel()
	if err := k.disableAndUnload(rctx, m.Name, ApplyOptions{Timeout: opts.timeout(), Progress: opts.Progress}); err != nil {
		return m, fmt.Errorf("%v\n  ROLLBACK FAILED: %w", te, err)
	}
	te.RolledBack = true
	return m, te
}

// verify checks that the patch was built for the running kernel: release,
// build-id, the module file's hash, and the code of every function it
// replaces.
func (k *Kernel) verify(path string, m *kmod.Module, e *Expect) error {
	rel, err := Release()
	if err != nil {
		return err
	}
	id, err := k.BuildID()
	if err != nil {
		return err
	}
	switch {
	case e.Release != rel:
		return fmt.Errorf("%w: built for %s, running %s", ErrWrongKernel, e.Release, rel)
	case e.BuildID != id:
		return fmt.Errorf("%w: built for kernel build-id %s, running %s (same release, different build)", ErrWrongKernel, e.BuildID, id)
	}
	if e.ModuleSHA256 != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != e.ModuleSHA256 {
			return fmt.Errorf("%w: %s is not the module its manifest describes (sha256 differs)", kmod.ErrNotModule, path)
		}
	}
	_, err = k.VerifyCode(e.Code)
	return err
}

// Revert disables the patch name, waits for the reverse transition, and
// unloads its module. A module whose patch is already disabled is just
// unloaded.
func (k *Kernel) Revert(ctx context.Context, name string, opts ApplyOptions) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: unloading a kernel module needs root (run with sudo)", ErrNotRoot)
	}
	if err := k.Supported(); err != nil {
		return err
	}
	if _, err := k.Patch(name); err != nil {
		if errors.Is(err, ErrUnknownPatch) {
			if _, serr := os.Stat(k.path("/sys/module/" + name)); serr == nil {
				// Disabled earlier; only the module is left.
				return k.unload(ctx, name, opts, time.Now())
			}
		}
		return err
	}
	if busy, err := k.inTransition(); err != nil {
		return err
	} else if busy != "" && busy != name {
		return fmt.Errorf("%w: %s (wait for it, or revert it first)", ErrBusy, busy)
	}
	return k.disableAndUnload(ctx, name, opts)
}

func (k *Kernel) disableAndUnload(ctx context.Context, name string, opts ApplyOptions) error {
	start := time.Now()
	if err := os.WriteFile(filepath.Join(k.patchDir(name), "enabled"), []byte("0"), 0); err != nil {
		return fmt.Errorf("disable %s: %w", name, err)
	}
	if err := k.waitTransition(ctx, name, false, opts, start); err != nil {
		return err
	}
	return k.unload(ctx, name, opts, start)
}

// waitTransition polls until the patch's transition is over. Enabling, it
// is over when transition reads 0; disabling, the kernel removes the
// patch's directory once every task is back.
func (k *Kernel) waitTransition(ctx context.Context, name string, enabling bool, opts ApplyOptions, start time.Time) error {
	phase := "unpatching"
	target := 0
	if enabling {
		phase, target = "patching", 1
	}
	deadline := time.Now().Add(opts.timeout())
	tick := time.NewTicker(k.poll())
	defer tick.Stop()
	lastReport := time.Time{}
	for {
		on, err := readBool(filepath.Join(k.patchDir(name), "transition"))
		switch {
		case errors.Is(err, fs.ErrNotExist) && !enabling:
			return nil // disabled and freed
		case errors.Is(err, fs.ErrNotExist):
			return fmt.Errorf("%w: %s vanished from /sys/kernel/livepatch during its transition (see dmesg)", ErrLoad, name)
		case err != nil:
			return err
		case !on && (enabling || !k.enabled(name)):
			return nil
		}
		if time.Since(lastReport) >= time.Second {
			holders := k.holders(target, false)
			opts.report(Progress{Patch: name, Phase: phase, Elapsed: time.Since(start), Pending: len(holders)})
			lastReport = time.Now()
		}
		if time.Now().After(deadline) {
			return &TransitionError{Patch: name, Enabling: enabling, Waited: time.Since(start), Holders: k.holders(target, true)}
		}
		select {
		case <-ctx.Done():
			return &TransitionError{Patch: name, Enabling: enabling, Waited: time.Since(start), Holders: k.holders(target, true)}
		case <-tick.C:
		}
	}
}

func (k *Kernel) enabled(name string) bool {
	on, err := readBool(filepath.Join(k.patchDir(name), "enabled"))
	return err == nil && on
}

// holders lists the tasks whose /proc/<pid>/task/<tid>/patch_state is not
// yet target (patch_state is -1 outside a transition, else 0 or 1).
func (k *Kernel) holders(target int, withStacks bool) []Task {
	procs, _ := filepath.Glob(k.path("/proc/[0-9]*/task/[0-9]*/patch_state"))
	var ts []Task
	for _, ps := range procs {
		b, err := os.ReadFile(ps)
		if err != nil {
			continue // the task exited
		}
		state, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || state < 0 || state == target {
			continue
		}
		dir := filepath.Dir(ps)
		t := Task{}
		t.PID, _ = strconv.Atoi(filepath.Base(dir))
		t.TGID, _ = strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(dir))))
		comm, _ := os.ReadFile(filepath.Join(dir, "comm"))
		t.Comm = strings.TrimSpace(string(comm))
		if withStacks {
			t.Stack = readStack(filepath.Join(dir, "stack"))
		}
		ts = append(ts, t)
	}
	return sortedTasks(ts)
}

// readStack reads a kernel stack, dropping the "[<0>] " address column
// that hides pointers from user space anyway.
func readStack(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if _, rest, ok := strings.Cut(l, "] "); ok {
			l = rest
		}
		if l != "" {
			out = append(out, l)
		}
	}
	return out
}

// load asks the kernel to load the module; module init calls
// klp_enable_patch, which starts the transition. On failure the error
// quotes what the kernel logged since kmsg was opened.
func (k *Kernel) load(path string, kmsg *KernelLog) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), "", 0)
	if err == nil {
		return nil
	}
	hint := ""
	switch {
	case errors.Is(err, unix.EEXIST):
		return fmt.Errorf("%w: %s", ErrAlreadyLoaded, path)
	case errors.Is(err, unix.EKEYREJECTED), errors.Is(err, unix.ENOKEY), errors.Is(err, unix.EPERM):
		hint = " (module signature required: sign it with a key the kernel trusts, or check lockdown)"
	case errors.Is(err, unix.ENOEXEC):
		hint = " (the kernel rejected the module's format)"
	case errors.Is(err, unix.ENOENT):
		hint = " (a symbol or object the patch needs is missing)"
	}
	msg := kmsg.ReadNew()
	if msg != "" {
		hint += "\n  kernel log:\n    " + strings.ReplaceAll(strings.TrimSpace(msg), "\n", "\n    ")
	}
	return fmt.Errorf("%w: load %s: %v%s", ErrLoad, path, err, hint)
}

// TroubleTaint are the taint bits that tell of a kernel in trouble:
// W (warning), D (oops or BUG), L (soft lockup).
const TroubleTaint = 1<<9 | 1<<7 | 1<<14

// watch polls taint and the kernel log for the Watch period after a
// transition. On trouble it reverts the patch.
func (k *Kernel) watch(ctx context.Context, name string, before Taint, kmsg *KernelLog, opts ApplyOptions, start time.Time) error {
	opts.report(Progress{Patch: name, Phase: "watching", Elapsed: time.Since(start)})
	end := time.Now().Add(opts.Watch)
	te := &TroubleError{Patch: name}
	for {
		te.Log = append(te.Log, TroubleLines(kmsg.ReadNew())...)
		now, err := k.Taint()
		if err != nil {
			return err
		}
		if added := now.Value &^ before.Value & TroubleTaint; added != 0 {
			te.NewTaint = DecodeTaint(added).String()
		}
		if te.NewTaint != "" || len(te.Log) > 0 {
			break
		}
		if time.Now().After(end) || ctx.Err() != nil {
			return nil
		}
		select {
		case <-ctx.Done():
		case <-time.After(k.poll()):
		}
	}
	k.log().Warn("kernel trouble after patching; reverting", "patch", name, "taint", te.NewTaint)
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), opts.timeout())
	defer cancel()
	if err := k.disableAndUnload(rctx, name, ApplyOptions{Timeout: opts.timeout(), Progress: opts.Progress}); err != nil {
		return fmt.Errorf("%v\n  REVERT FAILED: %w", te, err)
	}
	te.RolledBack = true
	return te
}

// unload removes the module once livepatch has let go of it: after a
// patch is disabled its kobjects are freed asynchronously and only then
// is the module's reference dropped.
func (k *Kernel) unload(ctx context.Context, name string, opts ApplyOptions, start time.Time) error {
	opts.report(Progress{Patch: name, Phase: "unload", Elapsed: time.Since(start)})
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := unix.DeleteModule(name, unix.O_NONBLOCK)
		switch {
		case err == nil:
			opts.report(Progress{Patch: name, Phase: "done", Elapsed: time.Since(start)})
			return nil
		case errors.Is(err, unix.ENOENT):
			return nil // already gone
		case !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EBUSY) && !errors.Is(err, unix.EWOULDBLOCK):
			return fmt.Errorf("unload %s: %w", name, err)
		case time.Now().After(deadline):
			return fmt.Errorf("unload %s: still in use after 10s: %w", name, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("unload %s: %w", name, ctx.Err())
		case <-time.After(k.poll()):
		}
	}
}
