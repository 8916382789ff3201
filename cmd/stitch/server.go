package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/server"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// runServer: stitch server [--listen ADDR] [--db FILE] [--dir REPO] [--keys DIR].
// The admin token comes from STITCH_ADMIN_TOKEN and a PostgreSQL DSN from
// STITCH_POSTGRES, so neither is in ps output.
func runServer(ctx context.Context, st *stdio, args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	fs.SetOutput(st.err)
	listen := fs.String("listen", "127.0.0.1:8440", "address to listen on")
	db := fs.String("db", "stitch-fleet.db", "SQLite database file (created if missing); unused when STITCH_POSTGRES is set")
	dir := fs.String("dir", "stitch-repo", "repository directory made by `stitch repo init`")
	keys := fs.String("keys", "", "online signing keys (targets, snapshot, timestamp) the server re-signs with (default DIR/keys)")
	every := fs.Duration("checkin-interval", time.Hour, "how long machines are told to wait between check-ins")
	stages := fs.String("stages", "1,10,50,100", "rollout stages, percent of eligible machines, growing to 100")
	maxFailures := fs.Int("max-failures", rollout.DefaultPolicy.MaxFailures, "failures a rollout tolerates; one more blocklists the patch")
	maxRate := fs.Float64("max-failure-rate", rollout.DefaultPolicy.MaxRate*100, "percent of machines that may fail (once 10 took part); more blocklists the patch")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	policy := rollout.Policy{Checks: rollout.DefaultPolicy.Checks, MaxFailures: *maxFailures, MaxRate: *maxRate / 100}
	for _, f := range strings.Split(*stages, ",") {
		pct, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil {
			return usageError{fmt.Errorf("--stages %q: %q is not a number", *stages, f)}
		}
		policy.Stages = append(policy.Stages, pct/100)
	}
	if err := policy.Validate(); err != nil {
		return fmt.Errorf("--stages, --max-failures, --max-failure-rate: %w", err)
	}
	token := os.Getenv("STITCH_ADMIN_TOKEN")
	if len(token) < 16 {
		return usageError{fmt.Errorf("set STITCH_ADMIN_TOKEN to an admin token of at least 16 characters")}
	}
	if *every < time.Minute {
		return usageError{fmt.Errorf("--checkin-interval %s: at least a minute", *every)}
	}
	repo := &bundle.Repo{Dir: *dir, KeysDir: *keys}
	if _, err := repo.TrustedRoot(); err != nil {
		return usageError{fmt.Errorf("server: %w (run `stitch repo init --dir %s`)", err, *dir)}
	}
	var s *store.SQL
	var err error
	where := *db
	if dsn := os.Getenv("STITCH_POSTGRES"); dsn != "" {
		s, err = store.OpenPostgres(ctx, dsn)
		where = "postgres"
	} else {
		s, err = store.OpenSQLite(ctx, *db)
	}
	if err != nil {
		return err
	}
	defer s.Close()
	// A server's log is read by machines: JSON lines at info level.
	log := slog.New(slog.NewJSONHandler(st.err, &slog.HandlerOptions{Level: slog.LevelInfo}))
	log.Info("serving", "listen", *listen, "db", where, "repo", *dir)
	return (&server.Server{Store: s, Repo: repo, AdminToken: token, Policy: policy, CheckInEvery: *every, Log: log}).Serve(ctx, *listen)
}
