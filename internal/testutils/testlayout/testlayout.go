// Package testlayout gives tests the special-section layout of the test
// kernel (testutils.Release), read from the BTF of the vmlinux inside its
// boot image, as a build reads it. It is apart from testutils because it
// needs internal/kallsyms, whose own tests use testutils.
package testlayout

import (
	"context"
	"os"
	"testing"

	"github.com/stitchpatch/stitch/internal/kallsyms"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/layout"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// Image is the boot image of the test kernel.
const Image = "/boot/vmlinuz-" + testutils.Release

// Vmlinux returns the path of the test kernel's vmlinux (extracted into
// the cache on first use), or skips the test (fails it in CI) without the
// kernel image.
func Vmlinux(t testing.TB) string {
	t.Helper()
	if _, err := os.Stat(Image); err != nil {
		testutils.Unavailable(t, "kernel image %s not installed", Image)
	}
	path, err := kallsyms.CachedVmlinux(context.Background(), Image, kernel.CacheDir(), nil)
	if err != nil {
		t.Fatalf("vmlinux of %s: %v", Image, err)
	}
	return path
}

// Real returns the layout of the test kernel.
func Real(t testing.TB) *layout.Layout {
	t.Helper()
	l, err := layout.FromVmlinux(Vmlinux(t))
	if err != nil {
		t.Fatalf("layout of %s: %v", Image, err)
	}
	return l
}
