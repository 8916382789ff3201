package livepatch

import (
	"fmt"
	"slices"
	"strings"
)

// genericThreadMains are kernel threads' main functions that run other
// code (work items, per-CPU hooks) and return to their loop: a thread
// held up in them waits for the code it runs, not for its main function.
var genericThreadMains = map[string]bool{
	"worker_thread": true, "rescuer_thread": true, "smpboot_thread_fn": true,
	"kthread_worker_fn": true,
}

// threadMain is the main function of a kernel thread from its stack (the
// frame that kthread called), or "" if the task is not a kernel thread
// or its main function is a generic one.
func threadMain(stack []string) string {
	for i, f := range stack {
		if strings.HasPrefix(f, "kthread+") && i > 0 {
			name, _, _ := strings.Cut(stack[i-1], "+")
			if genericThreadMains[name] {
				return ""
			}
			return name
		}
	}
	return ""
}

// kthreadHint explains a transition held up by kernel threads that may
// never leave their main function: if the patch changes that function,
// waiting longer does not help.
func kthreadHint(holders []Task) string {
	var threads []string
	mains := map[string]bool{}
	for _, t := range holders {
		if m := threadMain(t.Stack); m != "" {
			threads = append(threads, t.Comm)
			mains[m] = true
		}
	}
	if len(threads) == 0 {
		return ""
	}
	var names []string
	for m := range mains {
		names = append(names, m)
	}
	slices.Sort(names)
	return fmt.Sprintf("\n  kernel thread(s) %s run their main function (%s) until they stop: if the patch changes it, they never switch, whatever the wait; restart them around the transition from callbacks (docs/fix-author.md, \"Kernel threads that never leave a patched function\")",
		strings.Join(threads, ", "), strings.Join(names, ", "))
}
