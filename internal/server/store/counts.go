package store

import (
	"context"
	"fmt"
	"time"
)

// MachineCounts are the fleet's gauges.
type MachineCounts struct {
	Enrolled int
	// Stale machines checked in, last before staleBefore.
	Stale int
	// Never are the machines that never checked in.
	Never int
	// Unsupported machines last reported a kernel that cannot live-patch.
	Unsupported int
}

// MachineCounts counts with four COUNTs (0010_machine_gauges): the
// stale and the never checked in from the last_checkin index alone, the
// unsupported ones from a partial index of them alone.
func (s *SQL) MachineCounts(ctx context.Context, staleBefore time.Time) (MachineCounts, error) {
	var c MachineCounts
	for _, q := range []struct {
		dst   *int
		query string
		args  []any
	}{
		{&c.Enrolled, `SELECT COUNT(*) FROM machines`, nil},
		{&c.Stale, `SELECT COUNT(*) FROM machines WHERE last_checkin > 0 AND last_checkin < ?`, []any{unix(staleBefore)}},
		{&c.Never, `SELECT COUNT(*) FROM machines WHERE last_checkin = 0`, nil},
		{&c.Unsupported, `SELECT COUNT(*) FROM machines WHERE unsupported <> ''`, nil},
	} {
		if err := s.db.QueryRowContext(ctx, s.q(q.query), q.args...).Scan(q.dst); err != nil {
			return MachineCounts{}, fmt.Errorf("count machines: %w", err)
		}
	}
	return c, nil
}
