package corpus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/vm"
)

// step is one fix for the guest to try.
type step struct {
	Name   string `json:"name"`
	Module string `json:"module"` // the livepatch, in the guest
	Object string `json:"object"`
	File   string `json:"file"`           // the fixed source file: it picks the workloads
	Load   string `json:"load,omitempty"` // module to load first (with what it needs)
}

// outcome is the guest's answer for one step.
type outcome struct {
	Name    string `json:"name"`
	Outcome string `json:"outcome"`
	Reason  string `json:"reason,omitempty"`
}

const resultPrefix = "CORPUS-RESULT "

// VMOptions tune the VM stage.
type VMOptions struct {
	Kernel  string // boot image
	Stitch  string // static stitch binary; the running one if empty
	Modules string // /lib/modules/<release>
	Batch   int    // fixes per VM boot; 8 if zero
	Output  io.Writer
}

// ApplyAll tries every built fix in the VM, a batch per boot, and fills
// in the outcome of each. A batch whose VM fails marks its fixes
// apply-failed with the VM's error.
func ApplyAll(ctx context.Context, results []Result, o VMOptions) error {
	if o.Batch <= 0 {
		o.Batch = 8
	}
	mods, err := kmod.OpenIndex(o.Modules)
	if err != nil {
		return err
	}
	var todo []int
	for i, r := range results {
		if r.Outcome == NotRun {
			todo = append(todo, i)
		}
	}
	for len(todo) > 0 {
		n := min(o.Batch, len(todo))
		if err := applyBatch(ctx, results, todo[:n], mods, o); err != nil {
			return err
		}
		todo = todo[n:]
	}
	return nil
}

// applyBatch boots one VM for a batch of fixes. The guest sees the
// kernel's module directory, so a patched module loads as modprobe would
// load it, and modules its init asks the kernel for load too.
func applyBatch(ctx context.Context, results []Result, batch []int, mods *kmod.Index, o VMOptions) error {
	var files []vm.File
	var plan []step
	for _, i := range batch {
		r := results[i]
		s := step{Name: r.Name, Module: "/patches/" + r.Name + ".ko", Object: r.Object, File: r.File}
		files = append(files, vm.File{Src: r.Module, Dst: s.Module})
		if r.Object != "vmlinux" {
			if _, ok := mods.File(r.Object); !ok {
				results[i].Outcome, results[i].Reason = ApplyFailed, "module "+r.Object+" is not in modules.dep"
				continue
			}
			s.Load = r.Object
		}
		plan = append(plan, s)
	}
	if len(plan) == 0 {
		return nil
	}
	dir, err := os.MkdirTemp("", "stitch-corpus-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	pj, err := json.Marshal(plan)
	if err != nil {
		return err
	}
	planPath := filepath.Join(dir, "plan.json")
	if err := os.WriteFile(planPath, pj, 0o644); err != nil {
		return err
	}
	files = append(files, vm.File{Src: planPath, Dst: "/plan.json"})
	out := o.Output
	if out == nil {
		out = io.Discard
	}
	res, err := vm.Run(ctx, vm.Options{
		Kernel: o.Kernel, Init: o.Stitch, Files: files, Output: out,
		Args: []string{"stitch", "corpus-guest", "/plan.json"}, Memory: 1024, Timeout: 15 * time.Minute,
		Modules: o.Modules,
	})
	got := map[string]outcome{}
	if res != nil {
		for _, l := range strings.Split(res.Output, "\n") {
			var oc outcome
			if j, ok := strings.CutPrefix(l, resultPrefix); ok && json.Unmarshal([]byte(j), &oc) == nil {
				got[oc.Name] = oc
			}
		}
	}
	for _, i := range batch {
		if results[i].Outcome != NotRun {
			continue
		}
		if oc, ok := got[results[i].Name]; ok {
			results[i].Outcome, results[i].Reason = oc.Outcome, oc.Reason
		} else {
			results[i].Outcome, results[i].Reason = ApplyFailed, fmt.Sprintf("no result from the VM: %v", err)
		}
	}
	if errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// Guest runs inside the VM: for each step it loads the patched object's
// module, applies the patch, exercises the kernel, checks it for
// warnings, and reverts, printing one result line per step.
func Guest(ctx context.Context, planPath string, w io.Writer) error {
	b, err := os.ReadFile(planPath)
	if err != nil {
		return err
	}
	var plan []step
	if err := json.Unmarshal(b, &plan); err != nil {
		return fmt.Errorf("plan: %w", err)
	}
	k := &livepatch.Kernel{}
	for _, s := range plan {
		oc := guestStep(ctx, k, s)
		j, _ := json.Marshal(oc)
		fmt.Fprintf(w, "%s%s\n", resultPrefix, j)
	}
	return nil
}

func guestStep(ctx context.Context, k *livepatch.Kernel, s step) outcome {
	oc := outcome{Name: s.Name, Outcome: Applied}
	fail := func(kind, format string, args ...any) outcome {
		oc.Outcome, oc.Reason = kind, fmt.Sprintf(format, args...)
		return oc
	}
	absent := ""
	if s.Load != "" {
		if err := vm.Modprobe(s.Load); err != nil {
			if !noDevice(err) {
				return fail(ApplyFailed, "%v", err)
			}
			// The module's init refused: its hardware or hypervisor is
			// not in this VM. The patch still applies, and livepatch
			// patches the module when it loads; loading it again with
			// the patch on resolves the patch's relocations against it.
			absent = strings.Join(strings.Fields(err.Error()), " ")
		}
	}
	before, err := k.Taint()
	if err != nil {
		return fail(ApplyFailed, "%v", err)
	}
	baseline := runWorkloads(s.File)
	log := livepatch.OpenKernelLog()
	defer log.Close()
	m, err := k.Apply(ctx, s.Module, livepatch.ApplyOptions{Timeout: 30 * time.Second})
	if err != nil {
		return fail(ApplyFailed, "%s", strings.Join(strings.Fields(err.Error()), " "))
	}
	if absent != "" {
		if err := vm.Modprobe(s.Load); err == nil || !noDevice(err) {
			k.Revert(ctx, m.Name, livepatch.ApplyOptions{Timeout: 30 * time.Second})
			return fail(ApplyFailed, "%s cannot load here (%s); with the patch applied, loading it gave %v", s.Load, absent, err)
		}
		oc.Reason = fmt.Sprintf("applied with %s not loaded: %s; livepatch patches it when it loads (its load with the patch on failed the same way, no kernel warning)", s.Load, absent)
	}
	patched := runWorkloads(s.File)
	after, _ := k.Taint()
	trouble := livepatch.TroubleLines(log.ReadNew())
	if err := k.Revert(ctx, m.Name, livepatch.ApplyOptions{Timeout: 30 * time.Second}); err != nil {
		return fail(ApplyFailed, "revert: %v", err)
	}
	if added := after.Value &^ before.Value & livepatch.TroubleTaint; added != 0 || len(trouble) > 0 {
		return fail(KernelWarning, "taint +%s %s", livepatch.DecodeTaint(added), strings.Join(trouble, " | "))
	}
	if r := regressions(baseline, patched); len(r) > 0 {
		return fail(Regressed, "worked before the patch, failed with it: %s", strings.Join(r, "; "))
	}
	return oc
}

// noDevice tells a module whose init refused because what it drives is
// not there (ENODEV, ENXIO): a Xen front end outside Xen, a driver
// without its hardware.
func noDevice(err error) bool {
	return errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO)
}
