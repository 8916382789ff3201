package objdiff

import (
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// A function whose parameters changed while a table of the running
// kernel still points to it is refused, naming the table.
func TestSignatureChangedUnderTable(t *testing.T) {
	pre, post := compileCase(t, "signature")
	res, err := DiffFiles(pre, post, testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range res.Unsafe {
		if p.Kind == KindSignature && p.Symbol == "handler" {
			if !strings.Contains(p.Reason, "data handlers points to it") || !strings.Contains(p.Reason, "(int) to (int, int)") {
				t.Errorf("reason: %s", p.Reason)
			}
			return
		}
	}
	t.Fatalf("unsafe = %v, want handler's signature change refused", kinds(res.Unsafe))
}
