package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/server/api"
)

// `stitch fleet patches` prints the lost machines of each rollout, and
// under the table why a stopped rollout stopped. (The table's layout
// only: the report itself is the server's, tested there.)
func TestFleetPatchesShowsLostAndReasons(t *testing.T) {
	reps := []api.PatchReport{
		{Target: "6.1/a-0123456789abcdef.stitch", State: "complete", Stage: 3, Share: 1, Eligible: 40, Applied: 38, Healthy: 37, Lost: 1, Failed: 2, Counted: 2},
		{Target: "6.1/b-0123456789abcdef.stitch", State: "halted", Stage: 1, Share: 0.1, Eligible: 40, Applied: 6, Healthy: 6, Failed: 3, Counted: 3,
			Reason: "3 of 9 machines failed at stage 1 (...) — halted for an operator: stitch rollout resume or blocklist"},
	}
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/admin/reports/patches" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(reps)
	}))
	defer hs.Close()
	t.Setenv("STITCH_ADMIN_TOKEN", "admin-token-for-the-test")
	var out bytes.Buffer
	st := &stdio{out: &out, err: io.Discard, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if err := runFleet(context.Background(), st, []string{"patches", "--server=" + hs.URL}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 || !strings.Contains(lines[0], "HEALTHY  LOST  FAILED") || !strings.Contains(lines[1], "37       1     2") {
		t.Fatalf("table:\n%s", out.String())
	}
	if lines[3] != "6.1/b-0123456789abcdef.stitch halted: "+reps[1].Reason {
		t.Fatalf("reason line %q", lines[3])
	}
}
