package server

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/server/store"
)

// seedFleet enrolls n simulated machines (hostnames web00000, ...) and
// checks them in at now: two in three on simRelease, the others on a
// 6.12 kernel; every 50th silent for a day (stale), every 100th (from
// the 7th) without livepatch support.
func seedFleet(tb testing.TB, st store.Store, n int, now time.Time) {
	tb.Helper()
	ctx := context.Background()
	const perKey = 500
	for k := 0; k*perKey < n; k++ {
		id := fmt.Sprintf("seed%03d", k)
		if err := st.CreateKey(ctx, store.Key{ID: id, SecretHash: "secret-" + id, MaxMachines: perKey, CreatedAt: now, Group: "default"}); err != nil {
			tb.Fatal(err)
		}
		for i := k * perKey; i < min(n, (k+1)*perKey); i++ {
			m := store.Machine{ID: fmt.Sprintf("m-%05d", i), TokenHash: fmt.Sprintf("token-%05d", i), Hostname: fmt.Sprintf("web%05d", i)}
			if _, err := st.Enroll(ctx, "secret-"+id, m, now); err != nil {
				tb.Fatal(err)
			}
			ci := store.CheckIn{KernelRelease: simRelease, KernelBuildID: simBuildID, AgentVersion: "v1.2.0"}
			if i%3 == 2 {
				ci.KernelRelease, ci.KernelBuildID = "6.12.117+deb12-amd64", "aa"+simBuildID[2:]
			}
			if i%100 == 7 {
				ci.Unsupported = "the kernel has no livepatch support"
			}
			at := now
			if i%50 == 0 {
				at = now.Add(-24 * time.Hour)
			}
			if err := st.CheckIn(ctx, m.ID, ci, at); err != nil {
				tb.Fatal(err)
			}
		}
	}
}
