package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/server"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// runServer: stitch server [--listen ADDR] [--db FILE] [--dir REPO]
// [--keys DIR] [--tls-cert FILE --tls-key FILE] and the rollout policy
// and limits.
// The admin token comes from STITCH_TOKEN (or STITCH_ADMIN_TOKEN) and a PostgreSQL DSN from
// STITCH_POSTGRES, so neither is in ps output.
func runServer(ctx context.Context, st *stdio, args []string) error {
	fs := newFlagSet(st, "server", "", "Serves the patch repository, enrolls machines and rolls patches out in stages (HTTP API). The admin token comes from "+envToken+" (or "+envAdminToken+") and a PostgreSQL DSN from STITCH_POSTGRES, so neither is in ps output.")
	listen := fs.String("listen", "127.0.0.1:8440", "address to listen on")
	db := fs.String("db", "stitch-fleet.db", "SQLite database file (created if missing); unused when STITCH_POSTGRES is set")
	dir := fs.String("dir", "stitch-repo", "repository directory made by `stitch repo init`")
	keys := fs.String("keys", "", "online signing keys (targets, snapshot, timestamp) the server re-signs with (default DIR/keys)")
	every := fs.Duration("checkin-interval", time.Hour, "how long machines are told to wait between check-ins")
	stages := fs.String("stages", "1,10,50,100", "rollout stages, percent of eligible machines, growing to 100")
	maxFailures := fs.Int("max-failures", rollout.DefaultPolicy.MaxFailures,
		fmt.Sprintf("failures a rollout tolerates (each enrollment key's counting for at most max(%d, half its machines)); more halt it for an operator, or blocklist the patch past --max-failure-rate too", rollout.DefaultMaxFailuresPerKey))
	maxRate := fs.Float64("max-failure-rate", rollout.DefaultPolicy.MaxRate*100,
		fmt.Sprintf("percent of machines that may fail (once %d took part); more, with more than --max-failures, blocklists the patch", rollout.DefaultMinMachines))
	tlsCert := fs.String("tls-cert", "", "serve HTTPS with this PEM certificate (its chain after it); with --tls-key; both are read again on SIGHUP")
	tlsKey := fs.String("tls-key", "", "the PEM private key of --tls-cert")
	defaults := server.DefaultLimits
	var lim server.Limits
	fs.DurationVar(&lim.ReadTimeout, "read-timeout", defaults.ReadTimeout, "longest time to read a request, headers and body")
	fs.DurationVar(&lim.WriteTimeout, "write-timeout", defaults.WriteTimeout, "longest time to write an API answer")
	fs.DurationVar(&lim.DownloadTimeout, "download-timeout", defaults.DownloadTimeout, "longest time to send a repository file (a bundle on a slow link)")
	fs.DurationVar(&lim.IdleTimeout, "idle-timeout", defaults.IdleTimeout, "close a keep-alive connection idle this long")
	fs.IntVar(&lim.MaxConns, "max-conns", defaults.MaxConns, "open connections at most; more wait to be accepted")
	fs.Float64Var(&lim.ReportRate, "report-rate", defaults.ReportRate, "check-ins and health reports a second per machine, after the burst; more are answered 429")
	fs.IntVar(&lim.ReportBurst, "report-burst", defaults.ReportBurst, "check-ins and health reports a machine may send at once")
	if err := parseArgs(fs, args, 0); err != nil {
		return err
	}
	policy := rollout.DefaultPolicy
	policy.Stages, policy.MaxFailures, policy.MaxRate = nil, *maxFailures, *maxRate/100
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
	if lim.ReadTimeout <= 0 || lim.WriteTimeout <= 0 || lim.DownloadTimeout <= 0 || lim.IdleTimeout <= 0 || lim.MaxConns <= 0 || lim.ReportRate <= 0 || lim.ReportBurst <= 0 {
		return usageError{fmt.Errorf("--read-timeout, --write-timeout, --download-timeout, --idle-timeout, --max-conns, --report-rate, --report-burst: want positive values")}
	}
	if err := lim.Validate(); err != nil {
		return usageError{err}
	}
	token := envDefault(envToken, os.Getenv(envAdminToken))
	if len(token) < 16 {
		return usageError{fmt.Errorf("set %s to an admin token of at least 16 characters", envToken)}
	}
	if *every < time.Minute {
		return usageError{fmt.Errorf("--checkin-interval %s: at least a minute", *every)}
	}
	if (*tlsCert == "") != (*tlsKey == "") {
		return usageError{errors.New("--tls-cert and --tls-key go together: give both to serve HTTPS, or neither for plain HTTP")}
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
	srv := &server.Server{Store: s, Repo: repo, AdminToken: token, Policy: policy, CheckInEvery: *every, Log: log, Limits: lim}
	if *tlsCert != "" {
		certs, err := server.NewCertReloader(*tlsCert, *tlsKey, log)
		if err != nil {
			return usageError{fmt.Errorf("--tls-cert, --tls-key: %w", err)}
		}
		srv.TLS = certs.TLSConfig()
		// SIGHUP reads the pair again (a renewed certificate), for new
		// connections; a bad pair is logged and the old one stays.
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-hup:
					certs.Reload()
				}
			}
		}()
	}
	log.Info("serving", "listen", *listen, "tls", srv.TLS != nil, "db", where, "repo", *dir, "max_conns", lim.MaxConns, "read_timeout", lim.ReadTimeout.String(),
		"write_timeout", lim.WriteTimeout.String(), "download_timeout", lim.DownloadTimeout.String(), "idle_timeout", lim.IdleTimeout.String())
	return srv.Serve(ctx, *listen)
}
