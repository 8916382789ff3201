package demo

import (
	"context"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils"
)

// TestDemo runs the README's first command end to end: kbuild, VM, the
// real kernel patched and restored.
func TestDemo(t *testing.T) {
	testutils.RequireVM(t)
	testutils.RequireHeaders(t)
	var out strings.Builder
	err := Run(context.Background(), Options{Stitch: testutils.StitchBinary(t), Out: &out})
	t.Log(out.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"/proc/cmdline patched:  stitch demo: this kernel was patched live",
		"/proc/cmdline restored: console=ttyS0",
		"patched and restored without a reboot",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
}
