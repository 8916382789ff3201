package kernel_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// The default kernel, as scripts/install-deps.sh installs it, opens from
// the system with its exact source read from dpkg's metadata.
func TestOpenSystem(t *testing.T) {
	if _, err := os.Stat("/boot/vmlinuz-" + kernel.Default); err != nil {
		testutils.Unavailable(t, "kernel %s not installed", kernel.Default)
	}
	p, err := kernel.Open(context.Background(), t.TempDir(), kernel.Default)
	if err != nil {
		t.Fatal(err)
	}
	if p.Origin != kernel.OriginSystem || p.Release != kernel.Default || p.Flavour != "amd64" || p.Series != "6.1" {
		t.Errorf("profile %+v", p)
	}
	if p.Image.Name != "linux-image-"+kernel.Default || p.Source.Name != "linux-source-6.1" || p.Source.Version != p.Image.Version {
		t.Errorf("packages: image %v, source %v", p.Image, p.Source)
	}
	if !strings.HasPrefix(p.Compiler, "gcc-12 ") {
		t.Errorf("compiler %q", p.Compiler)
	}
	if !strings.HasSuffix(p.SourceDeb, "/debs/linux-source-6.1_"+p.Source.Version+"_all.deb") {
		t.Errorf("source deb %s", p.SourceDeb)
	}
}

// A release neither cached nor installed is ErrUnknown, naming the ones
// that are; a malformed one is ErrBadRelease.
func TestOpenUnknown(t *testing.T) {
	_, err := kernel.Open(context.Background(), t.TempDir(), "6.1.0-1-amd64")
	if !errors.Is(err, kernel.ErrUnknown) || !strings.Contains(err.Error(), "stitch kernel add 6.1.0-1-amd64") {
		t.Fatalf("err = %v", err)
	}
	if _, serr := os.Stat("/boot/vmlinuz-" + kernel.Default); serr == nil && !strings.Contains(err.Error(), kernel.Default) {
		t.Errorf("the error does not name the installed %s: %v", kernel.Default, err)
	}
	if _, err := kernel.Open(context.Background(), t.TempDir(), "../../etc"); !errors.Is(err, kernel.ErrBadRelease) {
		t.Errorf("bad release: %v", err)
	}
}
