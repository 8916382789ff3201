package corpus

import (
	"errors"
	"slices"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils"
	"github.com/stitchpatch/stitch/internal/vm"
)

func TestRegressions(t *testing.T) {
	broken := errors.New("broken")
	before := map[string]error{"sctp-loopback": broken}
	after := map[string]error{"sctp-loopback": broken, "pipe": broken}
	got := regressions(before, after)
	if !slices.Equal(got, []string{"pipe: broken"}) {
		t.Errorf("regressions = %q, want only the pipe, which worked before", got)
	}
	if r := regressions(after, before); len(r) != 0 {
		t.Errorf("a workload that recovered counted as a regression: %q", r)
	}
}

// TestWorkloadsInVM runs every workload in the real kernel, with the
// module directory shared as in the corpus runs: each must work there,
// or a fix's regression could not be told from a broken workload.
func TestWorkloadsInVM(t *testing.T) {
	testutils.RunGuest(t, "^TestGuestWorkloads$", vm.Options{Modules: testutils.ModulesDir})
}

func TestGuestWorkloads(t *testing.T) {
	testutils.RequireGuest(t)
	for _, file := range []string{"net/sctp/socket.c", "crypto/af_alg.c"} {
		for name, err := range runWorkloads(file) {
			t.Errorf("workload %s (for %s): %v", name, file, err)
		}
	}
}
