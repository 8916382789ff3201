package corpus

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// A fix whose upstream diff cannot be carried as it is (it changes a
// struct's layout, say) may have a livepatch form next to it, written by
// the fix author: DIR/livepatch/NAME.patch, the same fix with the struct
// kept as it is and the new field in a shadow variable (docs/fix-author.md).
// The runner builds that form instead of DIR/fixes/NAME.patch and counts
// the fix as applied with the fix author's help. A fix the author judged
// impossible to carry has DIR/livepatch/NAME.refused instead: one
// paragraph saying why no livepatch form or hook can make it safe; the
// runner refuses the fix with that reason.

// livepatchForm fills in e's livepatch form or the author's refusal, if
// DIR has one.
func livepatchForm(dir string, e *Entry) error {
	if p := filepath.Join(dir, "livepatch", e.Name+".patch"); fileExists(p) {
		e.Livepatch, e.Patch = p, p
	}
	p := filepath.Join(dir, "livepatch", e.Name+".refused")
	if !fileExists(p) {
		return nil
	}
	if e.Livepatch != "" {
		return fmt.Errorf("corpus fix %s: both a livepatch form and a refusal in %s: keep one", e.Name, filepath.Join(dir, "livepatch"))
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return fmt.Errorf("corpus fix %s: %w", e.Name, err)
	}
	e.AuthorRefusal = strings.Join(strings.Fields(string(b)), " ")
	if e.AuthorRefusal == "" {
		return fmt.Errorf("corpus fix %s: %s is empty: say why the fix cannot be carried", e.Name, p)
	}
	return nil
}

// authorRefuses makes r a refusal with the fix author's reason, whatever
// the build said: the author's judgement that no form of the fix is safe
// to apply to a running kernel stands even if a later Stitch builds it.
func authorRefuses(r *Result) {
	if r.AuthorRefusal == "" {
		return
	}
	reason := "fix author: " + r.AuthorRefusal
	if r.Outcome == Refused && r.Reason != "" {
		reason = r.Reason + "; " + reason
	}
	r.Outcome, r.Reason, r.Module = Refused, reason, ""
}
