package objdiff

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/kbuild"
	"github.com/stitchpatch/stitch/internal/kernel"
	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// kernelTree prepares the real 6.1.190 tree (cached across runs). It
// skips on a developer machine without the source, and fails in CI.
func kernelTree(t testing.TB) *kbuild.Tree {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	p, err := kernel.Open(ctx, kernel.CacheDir(), kernel.Default)
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skipf("no kernel %s (run scripts/install-deps.sh): %v", kernel.Default, err)
		}
		t.Fatal(err)
	}
	tree, err := kbuild.PrepareTree(ctx, kbuild.OptionsFor(p))
	if err != nil {
		if os.Getenv("CI") == "" && (errors.Is(err, kbuild.ErrNoSource) || errors.Is(err, kbuild.ErrCompiler)) {
			t.Skipf("no kernel tree (run scripts/install-deps.sh): %v", err)
		}
		t.Fatal(err)
	}
	return tree
}

// TestKernelFixes compiles objects of the Debian 6.1.190 source before and
// after real fixes from the corpus (copied into testdata/kernel) and
// checks the functions the differ reports.
func TestKernelFixes(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles kernel objects")
	}
	tree := kernelTree(t)
	lay := testlayout.Real(t)
	tests := []struct {
		fix     string
		object  string
		changed []string
		new     []string
		explain map[string][]string
	}{
		// GFP_KERNEL -> GFP_KERNEL_ACCOUNT in one allocation.
		{fix: "net_ipv4_ipmr_base.patch", object: "net/ipv4/ipmr_base.o", changed: []string{"mr_table_alloc"}},
		// An early return in retarget_shared_pending: gcc no longer makes
		// an .isra clone of it, so its callers now call a new function.
		{fix: "kernel_signal.patch", object: "kernel/signal.o",
			changed: []string{"__set_task_blocked", "exit_signals"}, new: []string{"retarget_shared_pending"}},
		// The fix is in _skcipher_recvmsg, which exists only inlined.
		{fix: "crypto_algif_skcipher.patch", object: "crypto/algif_skcipher.o",
			changed: []string{"skcipher_recvmsg"}, explain: map[string][]string{"_skcipher_recvmsg": {"skcipher_recvmsg"}}},
	}
	for _, tt := range tests {
		t.Run(tt.fix, func(t *testing.T) {
			ctx := context.Background()
			patch, err := os.ReadFile(filepath.Join("testdata", "kernel", tt.fix))
			if err != nil {
				t.Fatal(err)
			}
			files, _, err := tree.PatchedFiles(ctx, patch)
			if err != nil {
				t.Fatal(err)
			}
			if len(files) != 1 {
				t.Fatalf("fix touches %d files", len(files))
			}
			var src string
			for src = range files {
			}
			pre, post, err := tree.CompilePair(ctx, tt.object, src, files[src], "", t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			res, err := DiffFiles(pre, post, lay)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := json.MarshalIndent(res, "", "  ")
			t.Logf("%s", b)
			if got := names(res.Changed); !slices.Equal(got, nonNil(tt.changed)) {
				t.Errorf("changed = %q, want %q", got, tt.changed)
			}
			if got := names(res.New); !slices.Equal(got, nonNil(tt.new)) {
				t.Errorf("new = %q, want %q", got, tt.new)
			}
			if tt.explain != nil {
				got := map[string][]string{}
				for _, e := range res.Explanations {
					got[e.Inlined] = e.Changed
				}
				if fmt.Sprint(got) != fmt.Sprint(tt.explain) {
					t.Errorf("explanations = %v, want %v", got, tt.explain)
				}
			}
			if len(res.Unsafe) != 0 {
				t.Errorf("unsafe: %+v", res.Unsafe)
			}
		})
	}
}
