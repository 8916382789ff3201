package build

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/stitchpatch/stitch/internal/kbuild"
)

// Env is what building for one kernel needs: its source tree prepared
// like the kernel's, its headers, and its image and modules.
type Env struct {
	Tree    *kbuild.Tree
	Headers string
	Kernel  *Kernel
}

// OpenEnv prepares (or reuses, from cache) everything needed to build
// patches for release. image is its boot image (/boot/vmlinuz-<release>
// if empty).
func OpenEnv(ctx context.Context, release, image, cache string, log *slog.Logger) (*Env, error) {
	tree, err := kbuild.PrepareTree(ctx, kbuild.TreeOptions{Release: release, Cache: cache, Log: log})
	if err != nil {
		return nil, err
	}
	headers := kbuild.HeadersDir(release)
	k, err := OpenKernel(ctx, KernelOptions{Release: release, Image: image, Headers: headers, Cache: cache, Log: log})
	if err != nil {
		return nil, err
	}
	return &Env{Tree: tree, Headers: headers, Kernel: k}, nil
}

// Build builds fixes into a module for the environment's kernel. The
// objects are compiled in o.Work (a temporary directory if empty).
func (e *Env) Build(ctx context.Context, fixes []*Fix, o Options) (*Result, error) {
	if o.Work == "" {
		dir, err := os.MkdirTemp("", "stitch-build-")
		if err != nil {
			return nil, err
		}
		o.Work = dir // Build removes it unless o.KeepWork
	}
	src := &TreeSource{Tree: e.Tree, HeadersDir: e.Headers, Work: filepath.Join(o.Work, "objects")}
	res, err := Build(ctx, src, e.Kernel, fixes, o)
	if res != nil {
		res.Port = src.Port
	}
	return res, err
}
