package livepatch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
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
	// ErrRollbackFailed means Apply had to take a patch out again (its
	// transition stalled, or the kernel was in trouble after it) and
	// could not: the kernel may hold it partly applied. See RollbackError.
	ErrRollbackFailed = errors.New("rollback failed")
)

// RollbackError is a rollback that did not finish: what it was for, why
// it failed, and what the kernel still holds.
type RollbackError struct {
	Patch string `json:"patch"`
	// Cause is why the patch was being taken out: a *TransitionError
	// (the transition stalled) or a *TroubleError.
	Cause error `json:"-"`
	// Err is why the rollback failed, most often a *TransitionError of
	// the reverse transition; Reason is its text.
	Err    error  `json:"-"`
	Reason string `json:"reason"`
	// Still is the patch as /sys/kernel/livepatch shows it after the
	// attempt; nil when it is gone from there.
	Still        *Patch `json:"still,omitempty"`
	ModuleLoaded bool   `json:"module_loaded"`
	// Holders are the tasks that hold the reverse transition up.
	Holders []Task `json:"holders"`
}

func (e *RollbackError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%v\n  ROLLBACK FAILED: %v", e.Cause, e.Err)
	switch {
	case e.Still != nil && e.Still.Transition && !e.Still.Enabled:
		fmt.Fprintf(&b, "\n  the kernel still holds %s, disabled and in its reverse transition: the tasks above still run its code. The kernel keeps retrying; the transition ends once they leave the patched functions", e.Patch)
	case e.Still != nil:
		fmt.Fprintf(&b, "\n  the kernel still holds %s (enabled %v, in transition %v)", e.Patch, e.Still.Enabled, e.Still.Transition)
	case e.ModuleLoaded:
		fmt.Fprintf(&b, "\n  %s is disabled but its module is still loaded", e.Patch)
	}
	fmt.Fprintf(&b, "\n  then `stitch revert %s` unloads it; a reboot clears it in any case", e.Patch)
	return b.String()
}

// Unwrap gives ErrRollbackFailed, then the cause (errors.As finds the
// stalled transition or the trouble), then the rollback's own error.
func (e *RollbackError) Unwrap() []error { return []error{ErrRollbackFailed, e.Cause, e.Err} }

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
	b.WriteString(kthreadHint(e.Holders))
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

// openModule checks that this process may load modules into a kernel
// with livepatch, opens the module and reads it through that descriptor.
func (k *Kernel) openModule(path string) (*os.File, []byte, error) {
	if os.Geteuid() != 0 {
		return nil, nil, fmt.Errorf("%w: loading a kernel module needs root (run with sudo)", ErrNotRoot)
	}
	if err := k.Supported(); err != nil {
		return nil, nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	data, err := readModule(f)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, data, nil
}

// maxModule bounds what is read of a module file, far above any real
// module (the largest of a distribution kernel are tens of MB).
const maxModule = 1 << 30

// readModule reads the whole of a regular file from offset 0, as
// finit_module does.
func readModule(f *os.File) ([]byte, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	switch {
	case !fi.Mode().IsRegular():
		return nil, fmt.Errorf("%w: not a regular file (%v)", kmod.ErrNotModule, fi.Mode().Type())
	case fi.Size() > maxModule:
		return nil, fmt.Errorf("%w: %d bytes, more than any kernel module", kmod.ErrNotModule, fi.Size())
	}
	data := make([]byte, fi.Size())
	if _, err := f.ReadAt(data, 0); err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	return data, nil
}

// checkModule runs, on the module's bytes, every check Apply makes
// before it touches the kernel, and returns the module.
func (k *Kernel) checkModule(path string, data []byte) (*kmod.Module, error) {
	m, err := kmod.Read(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	m.Path = path
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
	if err := k.checkSignature(path, data); err != nil {
		return nil, err
	}
	if k.moduleLoaded(m.Name) {
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
// unloaded (or, with Force, forced), and a *TransitionError is returned;
// if the reversal fails too, a *RollbackError.
func (k *Kernel) Apply(ctx context.Context, path string, opts ApplyOptions) (*kmod.Module, error) {
	// One descriptor throughout: the module is checked and hashed from
	// the bytes read through f, and f is what the kernel loads, so a file
	// put in path's place meanwhile is not loaded unchecked.
	f, data, err := k.openModule(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m, err := k.checkModule(path, data)
	if err != nil {
		return nil, err
	}
	if opts.Expect != nil {
		opts.report(Progress{Patch: m.Name, Phase: "verify"})
		if err := k.verify(path, data, opts.Expect); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	taint, err := k.Taint()
	if err != nil {
		return nil, err
	}
	before, err := k.patchNames()
	if err != nil {
		return nil, err
	}
	kmsg := OpenKernelLog()
	defer kmsg.Close()
	opts.report(Progress{Patch: m.Name, Phase: "load"})
	if err := k.load(f, path, data, kmsg); err != nil {
		return nil, err
	}
	k.log().Info("module loaded", "module", m.Name, "elapsed", time.Since(start))

	err = k.waitTransition(ctx, m.Name, true, opts, start)
	var te *TransitionError
	if !errors.As(err, &te) {
		if err != nil {
			return m, err
		}
		if err := k.unloadReplaced(ctx, m.Name, before, opts, start); err != nil {
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
	if err := k.rollback(ctx, m.Name, te, opts); err != nil {
		return m, err
	}
	te.RolledBack = true
	return m, te
}

// rollback takes a patch out again because of cause: disables it, waits
// for the reverse transition and unloads the module. It has a deadline
// of its own, as the caller's may be what ran out. When it fails, the
// *RollbackError says what the kernel still holds.
func (k *Kernel) rollback(ctx context.Context, name string, cause error, opts ApplyOptions) error {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), opts.timeout())
	defer cancel()
	err := k.disableAndUnload(rctx, name, ApplyOptions{Timeout: opts.timeout(), Progress: opts.Progress})
	if err == nil {
		return nil
	}
	re := &RollbackError{Patch: name, Cause: cause, Err: err, Reason: err.Error(), Holders: []Task{}}
	var te *TransitionError
	if errors.As(err, &te) {
		re.Holders = te.Holders
	}
	if p, perr := k.Patch(name); perr == nil {
		re.Still = p
	}
	re.ModuleLoaded = k.moduleLoaded(name)
	k.log().Error("rollback failed: the kernel may hold the patch partly applied", "patch", name, "holders", len(re.Holders), "err", err)
	return re
}

// verify checks that the patch was built for the running kernel: release,
// build-id, the hash of the module's bytes (data, as read for loading),
// and the code of every function it replaces.
func (k *Kernel) verify(path string, data []byte, e *Expect) error {
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
		if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != e.ModuleSHA256 {
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
			if k.moduleLoaded(name) {
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
		case gone(err) && !enabling:
			return nil // disabled and freed
		case gone(err):
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

// load asks the kernel to load the module open as f (data, path names it
// in messages); module init calls klp_enable_patch, which starts the
// transition. On failure the error quotes what the kernel logged since
// kmsg was opened; a refused signature is a *SignatureError.
func (k *Kernel) load(f *os.File, path string, data []byte, kmsg *KernelLog) error {
	finit := k.finit
	if finit == nil {
		finit = func(f *os.File) error { return unix.FinitModule(int(f.Fd()), "", 0) }
	}
	err := finit(f)
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("%w: %s", ErrAlreadyLoaded, path)
	}
	msg := kmsg.ReadNew()
	obj := refusingCallback(msg)
	if obj == "" {
		if serr := k.explainRefusal(path, data, err, msg); serr != nil {
			return serr
		}
	}
	hint := ""
	switch {
	case obj != "":
		// The module's own pre-patch callback said no (its error is
		// what finit_module returns): nothing was patched.
		hint = fmt.Sprintf(" (the patch's pre-patch callback for %s refused it; the kernel patched nothing)", obj)
	case errors.Is(err, unix.EKEYREJECTED), errors.Is(err, unix.ENOKEY), errors.Is(err, unix.EPERM):
		hint = " (module signature required: sign it with a key the kernel trusts, or check lockdown)"
	case errors.Is(err, unix.ENOEXEC):
		hint = " (the kernel rejected the module's format)"
	case errors.Is(err, unix.ENOENT):
		hint = " (a symbol or object the patch needs is missing)"
	}
	if msg != "" {
		hint += "\n  kernel log:\n    " + strings.ReplaceAll(strings.TrimSpace(msg), "\n", "\n    ")
	}
	return fmt.Errorf("%w: load %s: %v%s", ErrLoad, path, err, hint)
}

// refusingCallback returns the object whose pre-patch callback failed,
// if the kernel log says so ("livepatch: pre-patch callback failed for
// object 'vmlinux'"), else "".
func refusingCallback(log string) string {
	const marker = "pre-patch callback failed for object '"
	i := strings.LastIndex(log, marker)
	if i < 0 {
		return ""
	}
	obj, _, ok := strings.Cut(log[i+len(marker):], "'")
	if !ok {
		return ""
	}
	return obj
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
	if err := k.rollback(ctx, name, te, opts); err != nil {
		return err
	}
	te.RolledBack = true
	return te
}

// patchNames lists the patches the kernel holds now.
func (k *Kernel) patchNames() ([]string, error) {
	if err := k.Supported(); err != nil {
		return nil, nil // load says why
	}
	ents, err := os.ReadDir(k.klpDir())
	if err != nil {
		return nil, fmt.Errorf("read livepatch state: %w", err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names, nil
}

// unloadReplaced unloads the modules of the patches a cumulative patch
// (klp_patch.replace) took over: once its transition is over the kernel
// disables them and frees them asynchronously, and their modules can only
// be unloaded, never enabled again. The new patch's "replace" attribute
// cannot tell, as 6.1 has none: a patch of before that is gone, or
// disabled though it was enabled before this Apply, was replaced (Apply
// does not run during another transition, so nothing else disabled it);
// one still enabled was not. unload waits out the asynchronous free.
func (k *Kernel) unloadReplaced(ctx context.Context, name string, before []string, opts ApplyOptions, start time.Time) error {
	for _, old := range before {
		if old == name || !k.moduleLoaded(old) {
			continue
		}
		if p, err := k.Patch(old); err == nil && p.Enabled || err != nil && !errors.Is(err, ErrUnknownPatch) {
			continue
		}
		k.log().Info("unloading the replaced patch's module", "patch", name, "replaced", old)
		if err := k.unload(ctx, old, ApplyOptions{Progress: opts.Progress}, start); err != nil {
			return fmt.Errorf("%s replaced %s: %w", name, old, err)
		}
	}
	return nil
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
