package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/testutils"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// `stitch server --tls-cert --tls-key` serves HTTPS and reads the pair
// again on SIGHUP; the flags go together; a bad pair at start is bad
// input naming the file.
func TestServerTLSAndSIGHUP(t *testing.T) {
	dir := t.TempDir()
	repo := &bundle.Repo{Dir: filepath.Join(dir, "repo")}
	if err := repo.Init(); err != nil {
		t.Fatal(err)
	}
	t.Setenv(envToken, "admin-token-for-the-test")
	ca := testutils.NewCA(t, "cli test CA")
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	write := func(serial int64) {
		c, k := ca.Issue(t, testutils.CertOptions{Serial: serial})
		if err := os.WriteFile(certFile, c, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(keyFile, k, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	db := filepath.Join(dir, "fleet.db")
	for name, args := range map[string][]string{
		"cert alone":  {"--tls-cert", certFile},
		"key alone":   {"--tls-key", keyFile},
		"no such key": {"--tls-cert", certFile, "--tls-key", filepath.Join(dir, "none.key")},
	} {
		write(1)
		st := &stdio{out: io.Discard, err: io.Discard, log: slog.New(slog.DiscardHandler)}
		err := runServer(context.Background(), st, append(args, "--dir", repo.Dir, "--db", db, "--listen", "127.0.0.1:0"))
		if exitCode(err) != exitUsage || !strings.Contains(err.Error(), "--tls-") {
			t.Errorf("%s: %v (exit %d), want bad input naming the flags", name, err, exitCode(err))
		}
	}

	write(201)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	var logs lockedBuffer
	st := &stdio{out: io.Discard, err: &logs, log: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- runServer(ctx, st, []string{"--tls-cert", certFile, "--tls-key", keyFile, "--dir", repo.Dir, "--db", db, "--listen", addr})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	serial := func() int64 {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}, DisableKeepAlives: true}
		resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("https://" + addr + "/v1/repo/metadata/root.json")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.TLS.PeerCertificates[0].SerialNumber.Int64()
	}
	deadline := time.Now().Add(10 * time.Second)
	for serial() != 201 {
		if time.Now().After(deadline) {
			t.Fatalf("the server never served its certificate over TLS; log:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Serving means runServer has registered for SIGHUP.
	write(202)
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	for serial() != 202 {
		if time.Now().After(deadline) {
			t.Fatalf("SIGHUP did not reload the certificate; log:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), `"tls":true`) || !strings.Contains(logs.String(), fmt.Sprintf(`"serial":"%x"`, 202)) {
		t.Errorf("the log does not say TLS and the reloaded serial:\n%s", logs.String())
	}
}

// `stitch agent enroll --ca FILE`: a file that cannot be read, or is not
// certificates, is bad input.
func TestAgentEnrollCAInput(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "root.json")
	notPEM := filepath.Join(dir, "not.pem")
	for _, f := range []string{root, notPEM} {
		if err := os.WriteFile(f, []byte("{}"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		ca, want string
	}{
		{filepath.Join(dir, "missing.pem"), "missing.pem"},
		{notPEM, "bad CA file " + notPEM},
	} {
		var out strings.Builder
		st := &stdio{out: &out, err: &out, log: slog.New(slog.DiscardHandler)}
		err := runAgent(context.Background(), st, []string{"enroll", "--server", "https://127.0.0.1:1", "--key", "k", "--root", root, "--ca", c.ca, "--dir", filepath.Join(dir, "agent")})
		if exitCode(err) != exitUsage || !strings.Contains(err.Error(), c.want) {
			t.Errorf("--ca %s: %v (exit %d), want bad input naming %q", c.ca, err, exitCode(err), c.want)
		}
	}
}
