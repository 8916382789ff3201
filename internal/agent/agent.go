// Package agent keeps one machine patched: it enrolls with a patch server,
// checks in on an interval, fetches the bundles the server offers for this
// exact kernel through TUF, proves each was built for the running code
// before loading it, applies it with the livepatch package, watches the
// kernel afterwards and reverts on trouble, reports health, and obeys
// revert orders. It keeps verified bundles so that the patches come back
// early at boot without a network, and it refuses to load again a patch
// that was being loaded when the machine went down (the crash marker).
//
// Everything it knows lives in one directory (Dir, /var/lib/stitch):
//
//	config.json   server, repository, machine id and token (mode 0600)
//	root.json     the TUF root pinned at enrollment
//	ca.pem        the CA pinned for https (enroll --ca), if any
//	state.json    the patches and what became of them, last check-in, unsent reports
//	tuf/          verified metadata and bundles (bundle.Client's cache)
//	modules/      the module files loaded from those bundles
//	loading/NAME  crash markers: a patch being loaded or in its first watch
//	off           the file switch: while it exists nothing is loaded
package agent

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/kmod"
	"github.com/stitchpatch/stitch/internal/livepatch"
	"github.com/stitchpatch/stitch/internal/server/api"
)

// DefaultDir is where the agent keeps its state.
const DefaultDir = "/var/lib/stitch"

// Errors a caller can test for with errors.Is.
var (
	// ErrNotEnrolled means Dir holds no configuration: run enroll first.
	ErrNotEnrolled = errors.New("agent not enrolled")
	// ErrLocked means another agent process holds Dir.
	ErrLocked = errors.New("another stitch agent is running")
	// ErrServer means the server could not be reached or failed; the
	// agent keeps its patches and tries again later.
	ErrServer = errors.New("patch server unavailable")
	// ErrRepository means the patch repository's metadata or a bundle
	// was refused by TUF (expired, rolled back, badly signed, not the
	// signed length and hash). It is no verdict on the patch: the agent
	// tries again later and reports no failure.
	ErrRepository = errors.New("patch repository refused")
	// ErrRedirect means the server or repository redirected elsewhere
	// than the scheme and host the agent was configured with.
	ErrRedirect = errors.New("redirect refused")
	// ErrCertificate means an https server's certificate was not signed
	// by the CA the agent trusts (the pinned one, or the system's).
	ErrCertificate = errors.New("server certificate not trusted")
	// ErrBadCA is a CA file (enroll --ca) that is not PEM certificates.
	ErrBadCA = errors.New("bad CA file")
)

// Kernel is what the agent needs of the running kernel: *livepatch.Kernel.
type Kernel interface {
	Status() (*livepatch.Status, error)
	Apply(ctx context.Context, path string, opts livepatch.ApplyOptions) (*kmod.Module, error)
	Revert(ctx context.Context, name string, opts livepatch.ApplyOptions) error
	Taint() (livepatch.Taint, error)
}

// KernelLog yields the kernel log lines written since the last call:
// *livepatch.KernelLog.
type KernelLog interface{ ReadNew() string }

// Agent is one machine's agent. Dir and Kernel are required.
type Agent struct {
	Dir    string
	Kernel Kernel
	Log    KernelLog // nil: trouble is seen through taint only
	// Root prefixes /proc (boot id, kernel command line) and
	// /etc/machine-id; tests point it elsewhere.
	Root    string
	Version string // reported in check-ins
	// Checks after an apply, overriding the schedule the server gives in
	// its check-in answers (and contract.DefaultSchedule, which a mirror
	// and an old server go by); for tests. The crash marker
	// lasts until the first one passes, so a patch that brings the
	// kernel down within it is never loaded again.
	Checks contract.Schedule
	// Timeout bounds each livepatch transition; 60s when zero.
	Timeout time.Duration
	Logger  *slog.Logger
	Now     func() time.Time
	// Sleep waits, or returns early with ctx's error; tests shorten it.
	Sleep func(ctx context.Context, d time.Duration) error
}

func (a *Agent) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return time.Now()
}

func (a *Agent) log() *slog.Logger {
	if a.Logger != nil {
		return a.Logger
	}
	return slog.New(slog.DiscardHandler)
}

func (a *Agent) sleep(ctx context.Context, d time.Duration) error {
	if a.Sleep != nil {
		return a.Sleep(ctx, d)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func (a *Agent) path(name ...string) string {
	return filepath.Join(append([]string{a.Dir}, name...)...)
}

// Config is the agent's configuration, written by Enroll.
type Config struct {
	// Server is the patch server's base URL. Empty means a mirror only
	// (air-gapped): every bundle in Repo for this kernel is applied, with
	// no check-ins, health reports or revert orders.
	Server string `json:"server,omitempty"`
	// Repo is the TUF repository's base URL: the server's /v1/repo by
	// default, or a mirror (http, https or file://).
	Repo string `json:"repo"`
	// Proxy is an HTTP proxy URL; empty means the environment's
	// (HTTPS_PROXY, HTTP_PROXY, NO_PROXY).
	Proxy     string `json:"proxy,omitempty"`
	MachineID string `json:"machine_id,omitempty"`
	Token     string `json:"token,omitempty"`
	// Interval between check-ins when the server does not say (and in
	// mirror mode); an hour when zero.
	IntervalSeconds int `json:"interval_seconds,omitempty"`
	// CA is a PEM file of the only CA certificates trusted for the
	// server and the repository over https (Dir/ca.pem, from enroll
	// --ca); empty means the system's roots.
	CA string `json:"ca,omitempty"`
}

func (c *Config) interval() time.Duration {
	if c.IntervalSeconds > 0 {
		return time.Duration(c.IntervalSeconds) * time.Second
	}
	return time.Hour
}

// httpClient honours Proxy, trusts only the CA in the CA file when there
// is one, follows no redirect that changes scheme or host (see
// sameOrigin), and serves file:// URLs from the local disk, so that a
// mirror can be a directory.
func (c *Config) httpClient() (*http.Client, error) {
	var ca *x509.CertPool
	if c.CA != "" {
		b, err := os.ReadFile(c.CA)
		if err != nil {
			return nil, fmt.Errorf("pinned CA: %w (enroll again with --ca, or remove \"ca\" from config.json to trust the system's CAs)", err)
		}
		if ca, err = parseCA(b, c.CA); err != nil {
			return nil, err
		}
	}
	return newHTTPClient(c.Proxy, ca)
}

func newHTTPClient(proxy string, ca *x509.CertPool) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if proxy != "" {
		u, err := url.Parse(proxy)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("proxy %q: want a URL such as http://proxy:3128", proxy)
		}
		tr.Proxy = http.ProxyURL(u)
	}
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: ca} // nil: the system's roots
	tr.RegisterProtocol("file", http.NewFileTransport(http.Dir("/")))
	return &http.Client{Transport: tr, Timeout: 5 * time.Minute, CheckRedirect: sameOrigin}, nil
}

// parseCA reads a PEM bundle of CA certificates (name is its file, for
// errors): nothing but certificates, at least one.
func parseCA(b []byte, name string) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	n := 0
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			if strings.TrimSpace(string(rest)) != "" {
				return nil, fmt.Errorf("%w %s: text that is not PEM: want PEM certificates (-----BEGIN CERTIFICATE-----)", ErrBadCA, name)
			}
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%w %s: a PEM %q block: want certificates only, never a key", ErrBadCA, name, blk.Type)
		}
		cert, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w %s: certificate %d: %v", ErrBadCA, name, n+1, err)
		}
		pool.AddCert(cert)
		n++
	}
	if n == 0 {
		return nil, fmt.Errorf("%w %s: no PEM certificate in it", ErrBadCA, name)
	}
	return pool, nil
}

// certHint explains a certificate the agent refused: which CA it trusts
// (caFile; empty for the system's) and what to do.
func certHint(err error, caFile string) error {
	var verr *tls.CertificateVerificationError
	var unknown x509.UnknownAuthorityError
	if !errors.As(err, &verr) && !errors.As(err, &unknown) {
		return err
	}
	if caFile != "" {
		return fmt.Errorf("%w: %v: the server's certificate is not signed by the CA in %s (--ca); give --ca the CA that issued the server's certificate (what `stitch server --tls-cert` serves), or check that --server names the right server", ErrCertificate, err, caFile)
	}
	return fmt.Errorf("%w: %v: the system's CAs do not trust the server's certificate; give --ca FILE with the CA that issued it (a PEM bundle)", ErrCertificate, err)
}

// sameOrigin refuses a redirect to another scheme or host than the
// request's first: a server must not send the agent to a local file
// (file://), to plain HTTP, or to a host its operator did not name.
func sameOrigin(req *http.Request, via []*http.Request) error {
	if len(via) >= 10 {
		return fmt.Errorf("%w: more than 10 redirects from %s", ErrRedirect, via[0].URL.Redacted())
	}
	from := via[0].URL
	if !strings.EqualFold(req.URL.Scheme, from.Scheme) || !strings.EqualFold(req.URL.Host, from.Host) {
		return fmt.Errorf("%w: %s redirected to %s://%s; the agent follows redirects only within %s://%s",
			ErrRedirect, from.Redacted(), req.URL.Scheme, req.URL.Host, from.Scheme, from.Host)
	}
	return nil
}

// EnrollOptions are what enrolling needs.
type EnrollOptions struct {
	Server string // base URL; empty for a mirror only
	Key    string // enrollment key (with Server)
	Group  string
	Repo   string // default Server + "/v1/repo"
	Proxy  string
	Root   []byte // the repository's root.json, from its operator
	// CA, when set, is a PEM bundle of the only CAs trusted for the
	// server and the repository over https, kept as Dir/ca.pem; CAFile
	// names where it came from, for errors. Empty: the system's roots.
	CA     []byte
	CAFile string
	// Hostname reported to the server; os.Hostname when empty.
	Hostname string
	Interval time.Duration
}

// RepoURL is a repository's URL as given (http://, https://, file://), or
// for an absolute path the file:// URL of that directory.
func RepoURL(s string) (string, error) {
	switch {
	case s == "" || strings.HasPrefix(s, "http://") || strings.HasPrefix(s, "https://") || strings.HasPrefix(s, "file:///"):
		return s, nil
	case filepath.IsAbs(s):
		return "file://" + filepath.Clean(s), nil
	}
	return "", fmt.Errorf("repository %q: want an http://, https:// or file:/// URL, or an absolute path", s)
}

// Enroll registers the machine with the server (when there is one) and
// writes the configuration and the pinned root into Dir. It refuses to
// enroll twice: remove Dir's config.json to start over.
func (a *Agent) Enroll(ctx context.Context, o EnrollOptions) (*Config, error) {
	if _, err := os.Stat(a.path("config.json")); err == nil {
		return nil, fmt.Errorf("enroll: %s already holds an enrolled agent (remove config.json there to enroll again)", a.Dir)
	}
	if len(o.Root) == 0 {
		return nil, fmt.Errorf("enroll: %w: the repository's root.json is needed (from `stitch repo root`)", bundle.ErrVerify)
	}
	if o.Server == "" && o.Repo == "" {
		return nil, errors.New("enroll: give a server URL, or a mirror's repository URL")
	}
	repo, err := RepoURL(o.Repo)
	if err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	if o.Server != "" && !strings.HasPrefix(o.Server, "http://") && !strings.HasPrefix(o.Server, "https://") {
		return nil, fmt.Errorf("enroll: server %q: want an http:// or https:// URL", o.Server)
	}
	cfg := &Config{Server: strings.TrimRight(o.Server, "/"), Repo: strings.TrimRight(repo, "/"), Proxy: o.Proxy, IntervalSeconds: int(o.Interval / time.Second)}
	if cfg.Repo == "" {
		cfg.Repo = cfg.Server + "/v1/repo"
	}
	var ca *x509.CertPool
	caName := "" // for certHint: empty means the system's roots
	if len(o.CA) > 0 {
		caName = o.CAFile
		if caName == "" {
			caName = "the pinned CA"
		}
		if !strings.HasPrefix(cfg.Server, "https://") && !strings.HasPrefix(cfg.Repo, "https://") {
			return nil, fmt.Errorf("enroll: %w: --ca %s pins a CA for https, but neither the server nor the repository is an https:// URL", ErrBadCA, o.CAFile)
		}
		if ca, err = parseCA(o.CA, o.CAFile); err != nil {
			return nil, fmt.Errorf("enroll: %w", err)
		}
	}
	hc, err := newHTTPClient(cfg.Proxy, ca)
	if err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	// The root must verify the repository now, before anything is kept:
	// a wrong root or an unreachable mirror is caught at enrollment.
	if err := os.MkdirAll(a.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	tc := &bundle.Client{BaseURL: cfg.Repo, TrustedRoot: o.Root, CacheDir: a.path("tuf"), HTTP: hc}
	if _, err := tc.Targets(ctx); err != nil {
		os.RemoveAll(a.path("tuf"))
		return nil, fmt.Errorf("enroll: repository %s: %w", cfg.Repo, certHint(err, caName))
	}
	certs, err := tc.SigningCerts(ctx)
	if err != nil {
		os.RemoveAll(a.path("tuf"))
		return nil, fmt.Errorf("enroll: repository %s: %w", cfg.Repo, certHint(err, caName))
	}
	if cfg.Server != "" {
		// The server keeps one record per host and key: enrolling again
		// (a reinstall) replaces it. No machine id, no such identity.
		hostID := ""
		if b, err := os.ReadFile(filepath.Join(a.Root, "/etc/machine-id")); err == nil {
			hostID, _ = HostID(string(b))
		}
		host := o.Hostname
		if host == "" {
			host = hostname(hostID)
		}
		c := &api.Client{BaseURL: cfg.Server, HTTP: hc}
		r, err := c.Enroll(ctx, api.EnrollRequest{Key: o.Key, Hostname: host, Group: o.Group, HostID: hostID})
		if err != nil {
			os.RemoveAll(a.path("tuf"))
			return nil, fmt.Errorf("enroll with %s: %w", cfg.Server, certHint(err, caName))
		}
		cfg.MachineID, cfg.Token = r.MachineID, r.Token
	}
	if ca != nil {
		// Kept beside the root, by absolute path, since the agent runs
		// from anywhere.
		p, err := filepath.Abs(a.path("ca.pem"))
		if err == nil {
			err = writeFile(p, o.CA, 0o644)
		}
		if err != nil {
			return nil, fmt.Errorf("enroll: %w", err)
		}
		cfg.CA = p
	}
	if err := writeFile(a.path("root.json"), o.Root, 0o644); err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	if err := a.keepSigningCerts(certs); err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	if err := writeJSON(a.path("config.json"), cfg, 0o600); err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	return cfg, nil
}

// hostname names the machine to its server: the host name, or, on a
// machine that has none set (an initramfs, a fresh image), its host id.
func hostname(hostID string) string {
	if h, err := os.Hostname(); err == nil && h != "" && h != "(none)" && h != "localhost" {
		return h
	}
	if hostID != "" {
		return "machine-" + hostID[:12]
	}
	return "unnamed"
}

// hostIDApp is Stitch's application id for HostID.
var hostIDApp = [16]byte{0xca, 0xcd, 0x1e, 0x4d, 0x87, 0x1d, 0x43, 0x74, 0x8a, 0x26, 0x29, 0x63, 0xcc, 0x50, 0x5e, 0xfd}

// HostID derives the host's identity for the server from the contents
// of /etc/machine-id without revealing it, as machine-id(5) asks of
// applications: HMAC-SHA256 keyed with the machine id over Stitch's
// application id, its first 16 bytes marked as a version 4 UUID, in hex.
// It equals `systemd-id128 machine-id --app-specific=cacd1e4d871d43748a262963cc505efd`,
// so an operator can tell which record is which host.
func HostID(machineID string) (string, error) {
	id, err := hex.DecodeString(strings.TrimSpace(machineID))
	if err != nil || len(id) != 16 {
		return "", fmt.Errorf("machine id %q: want 32 hex digits, as /etc/machine-id holds", strings.TrimSpace(machineID))
	}
	mac := hmac.New(sha256.New, id)
	mac.Write(hostIDApp[:])
	sum := mac.Sum(nil)[:16]
	sum[6] = sum[6]&0x0f | 0x40
	sum[8] = sum[8]&0x3f | 0x80
	return hex.EncodeToString(sum), nil
}

// config reads the configuration and the pinned root.
func (a *Agent) config() (*Config, []byte, error) {
	var cfg Config
	if err := readJSON(a.path("config.json"), &cfg); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil, fmt.Errorf("%w: %s has no config.json (run `stitch agent enroll`)", ErrNotEnrolled, a.Dir)
		}
		return nil, nil, err
	}
	root, err := os.ReadFile(a.path("root.json"))
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrNotEnrolled, err)
	}
	return &cfg, root, nil
}

// Disabled says whether loading is switched off, and by what.
func (a *Agent) Disabled() (bool, string) {
	if b, err := os.ReadFile(filepath.Join(a.Root, "/proc/cmdline")); err == nil && bootDisabled(string(b)) {
		return true, "stitch=off on the kernel command line"
	}
	if _, err := os.Stat(a.path("off")); err == nil {
		return true, a.path("off") + " exists (`stitch agent enable` removes it)"
	}
	return false, ""
}

// SetDisabled creates or removes the off file.
func (a *Agent) SetDisabled(off bool) error {
	if !off {
		if err := os.Remove(a.path("off")); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	if err := os.MkdirAll(a.Dir, 0o700); err != nil {
		return err
	}
	return writeFile(a.path("off"), []byte("patch loading disabled by `stitch agent disable`\n"), 0o644)
}

// bootID identifies this boot of the kernel; a crash marker from another
// boot means the machine went down while the patch was new.
func (a *Agent) bootID() string {
	b, err := os.ReadFile(filepath.Join(a.Root, "/proc/sys/kernel/random/boot_id"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// jitter spreads d by ±10% so that a fleet does not check in in step.
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return d
	}
	return d - d/10 + rand.N(d/5+1)
}

// Expect turns a manifest into the checks made before its module is
// loaded: the exact kernel, the module file, and the running code of every
// function it replaces.
func Expect(m *contract.Manifest) *livepatch.Expect {
	e := &livepatch.Expect{Release: m.Kernel.Release, BuildID: m.Kernel.BuildID, ModuleSHA256: m.ModuleHash}
	for _, o := range m.Objects {
		for _, f := range o.Functions {
			e.Code = append(e.Code, livepatch.CodeCheck{Object: o.Name, Name: f.Name, Sympos: f.Sympos, Fingerprint: f.Fingerprint})
		}
	}
	return e
}
