package build

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
)

// Env is what building for one kernel needs: its profile, its source
// tree prepared like the kernel's, its headers, and its image and modules.
type Env struct {
	Profile *kernel.Profile
	Tree    *kbuild.Tree
	Headers string
	Kernel  *Kernel
}

// OpenEnv prepares (or reuses, from cache) everything needed to build
// patches for the kernel of profile p (kernel.Open gives it).
func OpenEnv(ctx context.Context, p *kernel.Profile, cache string, log *slog.Logger) (*Env, error) {
	// The kernel first: one whose layouts or symbols cannot be read is
	// refused in seconds, before a minute or two of tree preparation.
	k, err := OpenKernel(ctx, p, cache, log)
	if err != nil {
		return nil, err
	}
	o := kbuild.OptionsFor(p)
	o.Cache, o.Log = cache, log
	tree, err := kbuild.PrepareTree(ctx, o)
	if err != nil {
		return nil, err
	}
	return &Env{Profile: p, Tree: tree, Headers: p.HeadersDir, Kernel: k}, nil
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
