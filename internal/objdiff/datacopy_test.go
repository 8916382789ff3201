package objdiff

import (
	"slices"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils/testlayout"
)

// A writable table that only a function reads through a memory operand
// is carried as a new copy, and its reader is replaced to use it.
func TestCarriedWritableData(t *testing.T) {
	pre, post := compileCase(t, "datacopy")
	res, err := DiffFiles(pre, post, testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	if !res.Patchable() {
		t.Fatalf("refused: %+v", res.Unsafe)
	}
	if len(res.NewData) != 1 || res.NewData[0].Replaces != "limits" || !strings.Contains(res.NewData[0].Why, "limit") {
		t.Fatalf("new data = %+v", res.NewData)
	}
	if !slices.Equal(names(res.Changed), []string{"limit"}) {
		t.Fatalf("changed = %v, want the reader limit replaced", names(res.Changed))
	}
	for _, r := range res.Changed[0].Refs {
		if r.Name == "limits" && !r.New {
			t.Errorf("limit's reference to limits does not go to the carried copy: %+v", r)
		}
	}
}

// A writable variable whose address a function passes on stays refused,
// and the reason names the function that lets it escape.
func TestRefusedEscapingData(t *testing.T) {
	pre, post := compileCase(t, "datacopy_escape")
	res, err := DiffFiles(pre, post, testlayout.Real(t))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(kinds(res.Unsafe), []string{KindData + ":limits"}) {
		t.Fatalf("unsafe = %v", kinds(res.Unsafe))
	}
	if why := res.Unsafe[0].Reason; !strings.Contains(why, "setup takes its address") || !strings.Contains(why, "STITCH_UPDATES_DATA") {
		t.Errorf("reason does not name the escape and the remedy: %s", why)
	}
	if len(res.NewData) != 0 {
		t.Errorf("new data = %+v", res.NewData)
	}
}
