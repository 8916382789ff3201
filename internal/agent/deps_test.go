package agent_test

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/testutils"
)

// The agent runs on every machine of a fleet: it reads manifests through
// internal/contract and must not link the build pipeline (compiler
// drivers, object differencing, module generation).
func TestAgentDoesNotLinkTheBuild(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		testutils.Unavailable(t, "the go tool")
	}
	out, err := exec.Command(goTool, "list", "-deps", "github.com/stitchpatch/stitch/internal/agent").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, stage := range []string{"build", "kbuild", "objdiff", "klpmod", "kallsyms", "corpus"} {
			if dep == "github.com/stitchpatch/stitch/internal/"+stage {
				t.Errorf("the agent links internal/%s", stage)
			}
		}
	}
}
