package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/server"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// runServer: stitch server [--listen ADDR] [--db FILE] [--dir REPO].
// The admin token comes from STITCH_ADMIN_TOKEN so it is not in ps output.
func runServer(ctx context.Context, st *stdio, args []string) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	fs.SetOutput(st.err)
	listen := fs.String("listen", "127.0.0.1:8440", "address to listen on")
	db := fs.String("db", "stitch-fleet.db", "SQLite database file (created if missing)")
	dir := fs.String("dir", "stitch-repo", "repository directory made by `stitch repo init`")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	token := os.Getenv("STITCH_ADMIN_TOKEN")
	if len(token) < 16 {
		return usageError{fmt.Errorf("set STITCH_ADMIN_TOKEN to an admin token of at least 16 characters")}
	}
	repo := &bundle.Repo{Dir: *dir}
	if _, err := repo.TrustedRoot(); err != nil {
		return usageError{fmt.Errorf("server: %w (run `stitch repo init --dir %s`)", err, *dir)}
	}
	s, err := store.OpenSQLite(ctx, *db)
	if err != nil {
		return err
	}
	defer s.Close()
	st.log.Warn("serving", "listen", *listen, "db", *db, "repo", *dir)
	return (&server.Server{Store: s, Repo: repo, AdminToken: token, Log: st.log}).Serve(ctx, *listen)
}
