package corpus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/vm"
)

// levelPlan is what the guest does with two levels: load the patched
// modules, run the workloads, apply the first level, run them, apply the
// second (which replaces it), run them, revert, run them.
type levelPlan struct {
	Load   []string `json:"load"`   // modules to load first
	Files  []string `json:"files"`  // the fixed source files: they pick the workloads
	Levels []string `json:"levels"` // the levels' modules, in the guest
}

const levelResultPrefix = "CORPUS-LEVEL-RESULT "

// Phase is one step of the guest's run.
type Phase struct {
	Name string `json:"name"` // baseline, apply l1, replace by l2, revert
	// Total is how long Apply or Revert took: Load (loading the module
	// and livepatch's init of it, up to the first transition report; for
	// a revert, disabling the patch up to that report), Transition (until every task runs the new code) and
	// Unload (the module a replace took over, or the reverted one).
	Total      time.Duration `json:"total_ns,omitempty"`
	Load       time.Duration `json:"load_ns,omitempty"`
	Transition time.Duration `json:"transition_ns,omitempty"`
	Unload     time.Duration `json:"unload_ns,omitempty"`
	// MaxPending is the most tasks a progress report found not yet
	// switched during the transition.
	MaxPending int      `json:"max_pending,omitempty"`
	Patches    []string `json:"livepatches"` // /sys/kernel/livepatch after it
	Loaded     []string `json:"level_modules_loaded"`
	Workloads  []string `json:"workloads"` // run
	Failed     []string `json:"failed,omitempty"`
	Error      string   `json:"error,omitempty"`
}

// LevelRun is what the VM stage of a cumulative level found.
type LevelRun struct {
	Loaded     []string `json:"modules_loaded"`
	LoadFailed []string `json:"modules_not_loaded,omitempty"` // with the reason
	Phases     []Phase  `json:"phases"`
	// Problems are the checks that failed: a workload that regressed, a
	// livepatch left over, a module not unloaded, a kernel warning.
	Problems []string `json:"problems,omitempty"`
	Taint    string   `json:"taint_added,omitempty"`
	Kernel   []string `json:"kernel_warnings,omitempty"`
	OK       bool     `json:"ok"`
}

// LevelVMOptions say what the VM stage of levels runs.
type LevelVMOptions struct {
	Kernel  string // boot image
	Stitch  string // static stitch binary; the running one if empty
	Modules string // /lib/modules/<release>
	Output  io.Writer
	Memory  int // MiB; 2048 if zero
}

// RunLevels applies the levels in one VM boot, in order (each replacing
// the one before), after loading the modules they patch, and reverts the
// last. mods are the klp objects that are modules; files pick workloads.
func RunLevels(ctx context.Context, levels []string, mods, files []string, o LevelVMOptions) (*LevelRun, error) {
	idx, err := kmod.OpenIndex(o.Modules)
	if err != nil {
		return nil, err
	}
	plan := levelPlan{Files: files}
	run := &LevelRun{}
	for _, m := range mods {
		if _, ok := idx.File(m); !ok {
			run.LoadFailed = append(run.LoadFailed, m+": not in modules.dep")
			continue
		}
		plan.Load = append(plan.Load, m)
	}
	var share []vm.File
	for _, l := range levels {
		dst := "/patches/" + filepath.Base(l)
		share = append(share, vm.File{Src: l, Dst: dst})
		plan.Levels = append(plan.Levels, dst)
	}
	dir, err := os.MkdirTemp("", "stitch-level-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	pj, err := json.Marshal(plan)
	if err != nil {
		return nil, err
	}
	planPath := filepath.Join(dir, "plan.json")
	if err := os.WriteFile(planPath, pj, 0o644); err != nil {
		return nil, err
	}
	share = append(share, vm.File{Src: planPath, Dst: "/plan.json"})
	out := o.Output
	if out == nil {
		out = io.Discard
	}
	mem := o.Memory
	if mem == 0 {
		mem = 2048
	}
	res, verr := vm.Run(ctx, vm.Options{
		Kernel: o.Kernel, Init: o.Stitch, Files: share, Output: out,
		Args: []string{"stitch", "corpus-guest", "--levels", "/plan.json"}, Memory: mem, Timeout: 60 * time.Minute,
		Modules: o.Modules,
	})
	if res != nil {
		for _, l := range strings.Split(res.Output, "\n") {
			if j, ok := strings.CutPrefix(l, levelResultPrefix); ok {
				var got LevelRun
				if err := json.Unmarshal([]byte(strings.TrimSpace(j)), &got); err != nil {
					return nil, fmt.Errorf("guest result: %w", err)
				}
				got.LoadFailed = append(run.LoadFailed, got.LoadFailed...)
				got.OK = got.OK && len(got.Problems) == 0
				return &got, nil
			}
		}
	}
	if verr == nil {
		verr = errors.New("the guest printed no result")
	}
	return nil, fmt.Errorf("levels in the VM: %w", verr)
}

// GuestLevels is the guest side of RunLevels.
func GuestLevels(ctx context.Context, planPath string, w io.Writer) error {
	b, err := os.ReadFile(planPath)
	if err != nil {
		return err
	}
	var plan levelPlan
	if err := json.Unmarshal(b, &plan); err != nil {
		return fmt.Errorf("plan: %w", err)
	}
	run := guestLevels(ctx, plan)
	j, err := json.Marshal(run)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s%s\n", levelResultPrefix, j)
	return err
}

func guestLevels(ctx context.Context, plan levelPlan) *LevelRun {
	run := &LevelRun{}
	problem := func(format string, args ...any) { run.Problems = append(run.Problems, fmt.Sprintf(format, args...)) }
	for _, m := range plan.Load {
		if err := vm.Modprobe(m); err != nil {
			run.LoadFailed = append(run.LoadFailed, fmt.Sprintf("%s: %v", m, err))
		} else {
			run.Loaded = append(run.Loaded, m)
		}
	}
	k := &livepatch.Kernel{}
	names := make([]string, len(plan.Levels))
	for i, l := range plan.Levels {
		names[i] = strings.TrimSuffix(filepath.Base(l), ".ko")
	}
	before, err := k.Taint()
	if err != nil {
		problem("taint: %v", err)
		return run
	}
	klog := livepatch.OpenKernelLog()
	defer klog.Close()
	opts := livepatch.ApplyOptions{Timeout: 2 * time.Minute}
	// phase runs the workloads and records what the kernel holds.
	phase := func(name string, t *timing, err error) (failed map[string]error) {
		p := Phase{Name: name}
		if t != nil {
			p.Total, p.Load, p.Transition, p.Unload, p.MaxPending = t.split()
		}
		if err != nil {
			p.Error = oneLine(err)
			problem("%s: %s", name, p.Error)
		}
		failed = runWorkloadsFor(plan.Files)
		p.Workloads = workloadsFor(plan.Files)
		for w, err := range failed {
			p.Failed = append(p.Failed, fmt.Sprintf("%s: %v", w, err))
		}
		sort.Strings(p.Failed)
		p.Patches = livepatches()
		for _, n := range names {
			if moduleLoaded(n) {
				p.Loaded = append(p.Loaded, n)
			}
		}
		run.Phases = append(run.Phases, p)
		return failed
	}
	baseline := phase("baseline", nil, nil)
	regressed := func(name string, now map[string]error) {
		if r := regressions(baseline, now); len(r) > 0 {
			problem("%s: worked before, failed: %s", name, strings.Join(r, "; "))
		}
	}
	for i, l := range plan.Levels {
		name := "apply " + names[i]
		if i > 0 {
			name = "replace " + names[i-1] + " by " + names[i]
		}
		tm := newTiming()
		_, err := k.Apply(ctx, l, tm.options(opts))
		failed := phase(name, tm.end(), err)
		regressed(name, failed)
		p := run.Phases[len(run.Phases)-1]
		if err != nil {
			break
		}
		// Exactly this level is live; the one it replaced is gone.
		if !slices.Equal(p.Patches, []string{names[i]}) {
			problem("%s: /sys/kernel/livepatch holds %v, want only %s", name, p.Patches, names[i])
		}
		if !slices.Equal(p.Loaded, []string{names[i]}) {
			problem("%s: level modules loaded %v, want only %s", name, p.Loaded, names[i])
		}
	}
	last := names[len(names)-1]
	tm := newTiming()
	err = k.Revert(ctx, last, tm.options(opts))
	failed := phase("revert "+last, tm.end(), err)
	regressed("revert", failed)
	p := run.Phases[len(run.Phases)-1]
	if len(p.Patches) != 0 || len(p.Loaded) != 0 {
		problem("after the revert: /sys/kernel/livepatch holds %v and level modules %v are loaded, want none", p.Patches, p.Loaded)
	}
	after, _ := k.Taint()
	if added := after.Value &^ before.Value & livepatch.TroubleTaint; added != 0 {
		run.Taint = livepatch.DecodeTaint(added).String()
		problem("taint +%s", run.Taint)
	}
	if trouble := livepatch.TroubleLines(klog.ReadNew()); len(trouble) > 0 {
		run.Kernel = trouble
		problem("kernel warnings: %s", strings.Join(trouble, " | "))
	}
	run.OK = len(run.Problems) == 0
	return run
}

// livepatches lists /sys/kernel/livepatch.
func livepatches() []string {
	ents, _ := os.ReadDir("/sys/kernel/livepatch")
	out := []string{}
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func moduleLoaded(name string) bool {
	_, err := os.Stat(filepath.Join("/sys/module", name))
	return err == nil
}

// timing splits an Apply or Revert by its progress reports.
type timing struct {
	start, stop time.Time
	// Since start: the first transition report (the load is over) and
	// the first unload report (the transition is).
	patching, unload time.Duration
	pending          int
}

func newTiming() *timing { return &timing{start: time.Now()} }

func (t *timing) options(o livepatch.ApplyOptions) livepatch.ApplyOptions {
	o.Progress = func(p livepatch.Progress) {
		switch p.Phase {
		case "patching", "unpatching":
			if t.patching == 0 {
				t.patching = time.Since(t.start)
			}
			t.pending = max(t.pending, p.Pending)
		case "unload":
			if t.unload == 0 {
				t.unload = time.Since(t.start)
			}
		}
	}
	return o
}

func (t *timing) end() *timing { t.stop = time.Now(); return t }

func (t *timing) split() (total, load, transition, unload time.Duration, pending int) {
	total = t.stop.Sub(t.start)
	end := t.unload
	if end == 0 {
		end = total
	}
	if t.patching > 0 {
		load, transition = t.patching, end-t.patching
	} else {
		load = end // over before the first poll
	}
	return total, load, transition, total - end, t.pending
}
