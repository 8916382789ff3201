package server

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ErrBadCertificate is a certificate and key pair the server cannot
// serve: unreadable, not a pair, expired, or not for a TLS server.
var ErrBadCertificate = errors.New("bad TLS certificate")

// CertReloader serves the certificate and key in CertFile and KeyFile and
// reads them again on Reload (`stitch server` calls it on SIGHUP): a new
// pair takes effect for the connections opened after it, without a
// restart, and a pair that does not load leaves the previous one served.
// Its TLSConfig is what Server.TLS takes.
type CertReloader struct {
	CertFile, KeyFile string
	Log               *slog.Logger
	Now               func() time.Time // injectable for tests

	mu  sync.Mutex // one Reload at a time
	cur atomic.Pointer[tls.Certificate]
}

// NewCertReloader loads the pair once: a server does not start without
// a certificate it can serve.
func NewCertReloader(certFile, keyFile string, log *slog.Logger) (*CertReloader, error) {
	c := &CertReloader{CertFile: certFile, KeyFile: keyFile, Log: log}
	if err := c.Reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// Reload reads the pair again and serves it to new connections, logging
// the certificate it took; on error it logs and returns it, and the
// certificate served before stays.
func (c *CertReloader) Reload() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	cert, err := c.load()
	log := c.Log
	if log == nil {
		log = slog.Default()
	}
	if err != nil {
		if c.cur.Load() != nil {
			log.Error("TLS certificate not reloaded; the previous one is still served", "cert", c.CertFile, "key", c.KeyFile, "err", err)
		}
		return err
	}
	c.cur.Store(cert)
	l := cert.Leaf
	log.Info("TLS certificate loaded", "cert", c.CertFile, "subject", l.Subject.String(), "dns_names", l.DNSNames,
		"serial", l.SerialNumber.Text(16), "not_after", l.NotAfter.UTC().Format(time.RFC3339))
	return nil
}

func (c *CertReloader) load() (*tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("%w: %s and %s: %v (want a PEM certificate, its chain after it, and its PEM private key)", ErrBadCertificate, c.CertFile, c.KeyFile, err)
	}
	l := cert.Leaf
	if l == nil {
		if l, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrBadCertificate, c.CertFile, err)
		}
		cert.Leaf = l
	}
	now := time.Now()
	if c.Now != nil {
		now = c.Now()
	}
	if now.After(l.NotAfter) {
		return nil, fmt.Errorf("%w: %s expired on %s: renew it", ErrBadCertificate, c.CertFile, l.NotAfter.UTC().Format(time.RFC3339))
	}
	if len(l.ExtKeyUsage) > 0 && !slices.Contains(l.ExtKeyUsage, x509.ExtKeyUsageServerAuth) && !slices.Contains(l.ExtKeyUsage, x509.ExtKeyUsageAny) {
		return nil, fmt.Errorf("%w: %s is not for a TLS server (its extended key usage lacks serverAuth)", ErrBadCertificate, c.CertFile)
	}
	return &cert, nil
}

// Certificate is the pair served now.
func (c *CertReloader) Certificate() *tls.Certificate { return c.cur.Load() }

// TLSConfig serves the current pair to each new connection, TLS 1.2 at
// least.
func (c *CertReloader) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return c.cur.Load(), nil
		},
	}
}

// loopback says whether the listener's address is reachable from this
// host only (an unspecified address, 0.0.0.0 or [::], is every address).
func loopback(a net.Addr) bool {
	if t, ok := a.(*net.TCPAddr); ok {
		return t.IP.IsLoopback()
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return false
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return ip != nil && ip.IsLoopback()
}
