package kmod_test

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/testutils"
)

func writeIndex(t *testing.T, files map[string]string) string {
	dir := t.TempDir()
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestResolve(t *testing.T) {
	dir := writeIndex(t, map[string]string{
		"modules.dep": "kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko\n" +
			"kernel/lib/libcrc32c.ko:\n" +
			"kernel/crypto/crc32c_generic.ko:\n" +
			"kernel/crypto/crc32c_intel.ko:\n" +
			"kernel/fs/nfs/nfsv4.ko: kernel/fs/nfs/nfs.ko kernel/net/sunrpc/sunrpc.ko\n" +
			"kernel/fs/nfs/nfs.ko: kernel/net/sunrpc/sunrpc.ko\n" +
			"kernel/net/sunrpc/sunrpc.ko:\n" +
			"kernel/drivers/net/virtio_net.ko:\n",
		"modules.alias": "# Aliases extracted from modules themselves.\n" +
			"alias fs-xfs xfs\n" +
			"alias crypto-crc32c crc32c_intel\n" +
			"alias crc32c crc32c_intel\n" +
			"alias crypto-crc32c crc32c_generic\n" +
			"alias crc32c crc32c_generic\n" +
			"alias virtio:d00000001v* virtio_net\n",
		"modules.softdep": "softdep libcrc32c pre: crc32c\nsoftdep nfs pre: unknown_mod post: sunrpc\n",
		"modules.builtin": "kernel/fs/ext2/ext2.ko\n",
	})
	x, err := kmod.OpenIndex(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		want []kmod.Load
	}{
		// The soft dependency is an alias with two modules; both are
		// optional and load before libcrc32c.
		{"fs-xfs", []kmod.Load{{"kernel/crypto/crc32c_intel.ko", true}, {"kernel/crypto/crc32c_generic.ko", true}, {"kernel/lib/libcrc32c.ko", false}, {"kernel/fs/xfs/xfs.ko", false}}},
		{"xfs", []kmod.Load{{"kernel/crypto/crc32c_intel.ko", true}, {"kernel/crypto/crc32c_generic.ko", true}, {"kernel/lib/libcrc32c.ko", false}, {"kernel/fs/xfs/xfs.ko", false}}},
		{"crc32c", []kmod.Load{{"kernel/crypto/crc32c_intel.ko", true}, {"kernel/crypto/crc32c_generic.ko", true}}},
		// Farthest dependency first; an unknown soft dependency is skipped.
		{"nfsv4", []kmod.Load{{"kernel/net/sunrpc/sunrpc.ko", false}, {"kernel/fs/nfs/nfs.ko", false}, {"kernel/fs/nfs/nfsv4.ko", false}}},
		{"virtio:d00000001v00001AF4", []kmod.Load{{"kernel/drivers/net/virtio_net.ko", false}}},
		{"virtio-net", []kmod.Load{{"kernel/drivers/net/virtio_net.ko", false}}},
		{"ext2", nil},
	} {
		got, err := x.Resolve(tc.name)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("Resolve(%q) = %v, %v; want %v", tc.name, got, err, tc.want)
		}
	}
	if _, err := x.Resolve("fs-nosuchfs"); !errors.Is(err, kmod.ErrNoModule) {
		t.Errorf("Resolve(fs-nosuchfs) error = %v, want ErrNoModule", err)
	}
}

func TestOpenIndexMissing(t *testing.T) {
	if _, err := kmod.OpenIndex(t.TempDir()); err == nil {
		t.Fatal("OpenIndex of a directory without modules.dep succeeded")
	}
}

// The Debian kernel's own indexes: names the kernel asks for at run time
// resolve to real files.
func TestResolveDistroKernel(t *testing.T) {
	dir := filepath.Join("/lib/modules", testutils.Release)
	if _, err := os.Stat(filepath.Join(dir, "modules.dep")); err != nil {
		testutils.Unavailable(t, "no %s (apt-get install linux-image-%s): %v", dir, testutils.Release, err)
	}
	x, err := kmod.OpenIndex(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := x.Resolve("fs-xfs")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) < 3 || got[len(got)-1] != (kmod.Load{File: "kernel/fs/xfs/xfs.ko"}) || !slices.Contains(got, kmod.Load{File: "kernel/lib/libcrc32c.ko"}) {
		t.Errorf("Resolve(fs-xfs) = %v", got)
	}
	for _, l := range got {
		if _, err := os.Stat(filepath.Join(dir, l.File)); err != nil {
			t.Error(err)
		}
	}
	if got, err := x.Resolve("9p"); err != nil || !slices.Contains(got, kmod.Load{File: "kernel/net/9p/9pnet.ko"}) {
		t.Errorf("Resolve(9p) = %v, %v", got, err)
	}
}
