package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/testutils"
)

// writePair writes a certificate and key where the server reads them.
func writePair(t *testing.T, certFile, keyFile string, cert, key []byte) {
	t.Helper()
	if err := os.WriteFile(certFile, cert, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		t.Fatal(err)
	}
}

// servedSerial opens a new TLS connection to addr, trusting ca only, and
// returns the serial of the certificate the server presented, and the
// protocol of an HTTP request on it.
func servedSerial(t *testing.T, addr string, ca *testutils.CA) (*big.Int, string) {
	t.Helper()
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}, DisableKeepAlives: true, ForceAttemptHTTP2: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + addr + "/v1/repo/metadata/root.json")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("root.json over TLS: %d", resp.StatusCode)
	}
	return resp.TLS.PeerCertificates[0].SerialNumber, resp.Proto
}

// The server serves TLS (1.2 at least, HTTP/1.1) with the pair its
// CertReloader read; Reload after a new pair is written serves it to new
// connections without a restart; a bad pair (mismatched, garbage,
// expired, a client certificate) is refused with a logged error and the
// previous certificate stays.
func TestTLSReload(t *testing.T) {
	ca := testutils.NewCA(t, "stitch test CA")
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key")
	c1, k1 := ca.Issue(t, testutils.CertOptions{Serial: 101})
	writePair(t, certFile, keyFile, c1, k1)
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	certs, err := NewCertReloader(certFile, keyFile, log)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := newServer(t, Limits{})
	s.TLS, s.Log = certs.TLSConfig(), log
	addr := startServer(t, s)

	serial, proto := servedSerial(t, addr, ca)
	if serial.Int64() != 101 || proto != "HTTP/1.1" {
		t.Fatalf("first pair: serial %v over %s, want 101 over HTTP/1.1", serial, proto)
	}
	// Plain HTTP on the TLS port gets nothing useful; TLS 1.1 is refused.
	if resp, err := http.Get("http://" + addr + "/v1/repo/metadata/root.json"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Fatal("plain HTTP served on the TLS listener")
		}
	}
	if c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool(), MaxVersion: tls.VersionTLS11}); err == nil {
		c.Close()
		t.Fatal("a TLS 1.1 handshake succeeded")
	}
	// A connection kept open across the reload keeps its certificate.
	old, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool()})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()

	c2, k2 := ca.Issue(t, testutils.CertOptions{Serial: 102})
	writePair(t, certFile, keyFile, c2, k2)
	if err := certs.Reload(); err != nil {
		t.Fatal(err)
	}
	if serial, _ := servedSerial(t, addr, ca); serial.Int64() != 102 {
		t.Fatalf("after Reload: serial %v, want 102", serial)
	}
	if got := old.ConnectionState().PeerCertificates[0].SerialNumber.Int64(); got != 101 {
		t.Errorf("the open connection's certificate changed to %d", got)
	}

	c3, k3 := ca.Issue(t, testutils.CertOptions{Serial: 103})
	expired, expiredKey := ca.Issue(t, testutils.CertOptions{Serial: 104, NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})
	client, clientKey := ca.Issue(t, testutils.CertOptions{Serial: 105, ClientOnly: true})
	for name, pair := range map[string][2][]byte{
		"mismatched key": {c3, k2},
		"garbage":        {[]byte("not a certificate"), k3},
		"no key":         {c3, nil},
		"expired":        {expired, expiredKey},
		"client only":    {client, clientKey},
	} {
		writePair(t, certFile, keyFile, pair[0], pair[1])
		before := len(logs.String())
		err := certs.Reload()
		if !errors.Is(err, ErrBadCertificate) {
			t.Errorf("%s: Reload: %v, want ErrBadCertificate", name, err)
		}
		if line := logs.String()[before:]; !strings.Contains(line, "level=ERROR") || !strings.Contains(line, "not reloaded") || !strings.Contains(line, certFile) {
			t.Errorf("%s: logged %q, want an error naming %s", name, line, certFile)
		}
		if serial, _ := servedSerial(t, addr, ca); serial.Int64() != 102 {
			t.Errorf("%s: serial %v served after a bad pair, want 102 still", name, serial)
		}
	}
	if !strings.Contains(logs.String(), "serial=66") { // 102 in hex
		t.Errorf("the loaded certificate's serial not logged: %s", logs.String())
	}
	// A server does not start with a bad pair.
	if _, err := NewCertReloader(certFile, filepath.Join(dir, "none.key"), log); !errors.Is(err, ErrBadCertificate) {
		t.Errorf("start with a missing key: %v", err)
	}
}

// Plain HTTP warns that tokens travel in clear when it listens beyond
// loopback, not on loopback.
func TestPlainHTTPWarnsOffLoopback(t *testing.T) {
	for _, tc := range []struct {
		listen string
		warn   bool
	}{{"127.0.0.1:0", false}, {"0.0.0.0:0", true}} {
		l, err := net.Listen("tcp", tc.listen)
		if err != nil {
			t.Skipf("listen %s: %v", tc.listen, err)
		}
		var logs syncBuffer
		s, _ := newServer(t, Limits{})
		s.Log = slog.New(slog.NewTextHandler(&logs, nil))
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.ServeListener(ctx, l) }()
		// Serving: a request answered means the warning, if any, is out.
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/v1/repo/metadata/root.json", l.Addr().(*net.TCPAddr).Port))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if got := strings.Contains(logs.String(), "tokens travel in clear"); got != tc.warn {
			t.Errorf("listening on %s: warned %v, want %v (log %q)", tc.listen, got, tc.warn, logs.String())
		}
	}
	for addr, want := range map[string]bool{"127.0.0.1:8440": true, "[::1]:8440": true, "0.0.0.0:8440": false, "[::]:8440": false, "192.0.2.1:8440": false} {
		a, err := net.ResolveTCPAddr("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		if got := loopback(a); got != want {
			t.Errorf("loopback(%s) = %v", addr, got)
		}
	}
}
