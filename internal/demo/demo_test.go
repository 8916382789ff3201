package demo

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// TestDemo runs the README's first command end to end: a source fix
// built for the real kernel, applied in the VM, and reverted.
func TestDemo(t *testing.T) {
	testutils.RequireVM(t)
	testutils.RequireHeaders(t)
	var out strings.Builder
	err := Run(context.Background(), Options{Stitch: testutils.StitchBinary(t), Out: &out})
	t.Log(out.String())
	if errors.Is(err, kbuild.ErrNoSource) {
		testutils.Unavailable(t, "%v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"/proc/cmdline patched:  console=ttyS0 quiet panic=-1 (patched live by stitch)",
		"/proc/cmdline restored: console=ttyS0",
		"patched and restored without a reboot",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
}
