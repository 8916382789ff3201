package testutils

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestKernelLists checks the kernel lists against the Makefile, which
// `make kernels` (and so CI) fetches from: its default TEST_KERNELS is
// DefaultTestKernels, and every kernel a VM test boots is Release or one
// of them.
func TestKernelLists(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(ModuleRoot(t), "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	var makefile []string
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "TEST_KERNELS ?="); ok {
			makefile = strings.Fields(v)
		}
	}
	if !slices.Equal(makefile, DefaultTestKernels()) {
		t.Errorf("the Makefile's TEST_KERNELS are %q, DefaultTestKernels %q: make them agree", makefile, DefaultTestKernels())
	}
	if vk := VMKernels(); len(vk) == 0 || vk[0] != Release {
		t.Errorf("VMKernels %q do not start with Release %s", vk, Release)
	}
	for _, r := range VMKernels() {
		if r != Release && !slices.Contains(makefile, r) {
			t.Errorf("VM tests boot %s, which the Makefile's TEST_KERNELS (%q) do not fetch", r, makefile)
		}
	}
}
