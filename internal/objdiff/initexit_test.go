package objdiff

import (
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// A changed __exit function that only its module_exit record points to
// is marked ExitOnly (built into vmlinux, it never runs); the refusal
// still names what it touches, for a module's case.
func TestExitOnly(t *testing.T) {
	pre, post := compileCase(t, "exit_builtin")
	res, err := DiffFiles(pre, post, testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Unsafe) != 1 || res.Unsafe[0].Symbol != "teardown" || !res.Unsafe[0].ExitOnly {
		t.Fatalf("unsafe = %+v, want teardown marked exit-only", res.Unsafe)
	}
	if why := res.Unsafe[0].Reason; !strings.Contains(why, "state") || !strings.Contains(why, "STITCH_CARRIES_INIT(teardown)") {
		t.Errorf("reason does not name the variable and the declaration: %s", why)
	}
}

// An exit function that init code also calls (an error path) may have
// run at boot: it is not exit-only, and stays refused.
func TestExitCalledFromInit(t *testing.T) {
	pre, post := compileCase(t, "exit_called")
	res, err := DiffFiles(pre, post, testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, p := range res.Unsafe {
		if p.Symbol == "teardown" {
			found = true
			if p.ExitOnly {
				t.Errorf("teardown is called from setup but marked exit-only")
			}
		}
	}
	if !found {
		t.Fatalf("unsafe = %+v, want teardown refused", res.Unsafe)
	}
}
