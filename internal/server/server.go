// Package server is the HTTP side of patch distribution: it serves the TUF
// repository and bundles under /v1/repo/, enrolls machines with enrollment
// keys that carry a machine limit and an expiry, takes machines' check-ins
// and health reports, and rolls registered patches out in stages (rules in
// server/rollout), halting and blocklisting a patch by itself when machines
// report failures. Admin calls use a separate bearer token; a machine token
// never acts as admin, and a machine only reads and reports for itself.
// All state is in the store, so several replicas can share PostgreSQL.
package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/stitchpatch/stitch/internal/bundle"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// maxBody bounds every request body.
const maxBody = api.MaxRequest

// Server handles the API.
type Server struct {
	Store      store.Store
	Repo       *bundle.Repo
	AdminToken string // required, compared in constant time
	// Policy is every rollout's policy; rollout.DefaultPolicy when zero.
	Policy rollout.Policy
	// CheckInEvery is what machines are told to wait between check-ins
	// (an hour when zero).
	CheckInEvery time.Duration
	Now          func() time.Time // injectable so tests can run a fake clock
	Log          *slog.Logger
	// Limits bound connections, their timeouts and each machine's
	// reports; DefaultLimits for zero fields.
	Limits Limits
	// TLS, when set, makes ServeListener serve HTTPS (HTTP/1.1, TLS 1.2
	// at least) with it: CertReloader.TLSConfig. Without it the server
	// speaks plain HTTP and warns when that is not on loopback.
	TLS *tls.Config

	once         sync.Once
	metrics      *metrics
	limiter      *reportLimiter
	adminSum     [sha256.Size]byte             // of AdminToken, read by Handler
	pages        map[string]*template.Template // the console's, parsed by Handler
	figuresCache figuresCache                  // the console's fleet-wide figures

	mu      sync.Mutex
	refused map[string]bool // contained records that did not verify, logged once
	// Refused enrollments are logged at most refusedLogMax a minute.
	refusedWindow                time.Time
	refusedLogged, refusedHidden int
}

// refusedLogMax bounds the refused enrollments logged a minute: anyone
// can send them, and the log must grow with events, not with a flood.
const refusedLogMax = 60

// refusedEnrollment counts a refused enrollment by reason and logs it
// (the key's id when the key is known, never its secret; the remote
// address; why), within refusedLogMax a minute; the lines left out are
// counted in the next window's first.
func (s *Server) refusedEnrollment(r *http.Request, reason, keyID, hostname, why string) {
	s.metrics.refusedEnrollment(reason)
	now := s.now()
	s.mu.Lock()
	hidden := 0
	if now.Sub(s.refusedWindow) >= time.Minute || now.Before(s.refusedWindow) {
		s.refusedWindow, s.refusedLogged, hidden, s.refusedHidden = now, 0, s.refusedHidden, 0
	}
	ok := s.refusedLogged < refusedLogMax
	if ok {
		s.refusedLogged++
	} else {
		s.refusedHidden++
	}
	s.mu.Unlock()
	if hidden > 0 {
		s.log().Warn("refused enrollments not logged (over the log limit)", "count", hidden, "limit_per_minute", refusedLogMax)
	}
	if !ok {
		return
	}
	attrs := []any{"reason", reason, "remote", remoteHost(r), "why", why}
	if keyID != "" {
		attrs = append(attrs, "key", keyID)
	}
	if hostname != "" {
		attrs = append(attrs, "hostname", hostname)
	}
	s.log().Warn("enrollment refused", attrs...)
}

// remoteHost is the client's address without its port (a proxy's, when
// there is one: forwarded headers are not trusted).
func remoteHost(r *http.Request) string {
	if h, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		return h
	}
	return r.RemoteAddr
}

// FreeTierMachines is the machine limit of a key created without one.
const FreeTierMachines = 3

func (s *Server) now() time.Time {
	if s.Now != nil {
		return s.Now().UTC()
	}
	return time.Now().UTC()
}

func (s *Server) policy() rollout.Policy {
	if len(s.Policy.Stages) == 0 {
		return rollout.DefaultPolicy
	}
	return s.Policy
}

// Handler returns the routes.
func (s *Server) Handler() http.Handler {
	s.once.Do(func() {
		lim := s.Limits.withDefaults()
		s.metrics = newMetrics()
		s.limiter = newReportLimiter(lim.ReportRate, lim.ReportBurst, maxBuckets)
		s.adminSum = sha256.Sum256([]byte(s.AdminToken))
		var err error
		if s.pages, err = consolePages(); err != nil {
			panic(err) // the embedded templates are part of the build
		}
	})
	mux := http.NewServeMux()
	mux.Handle("GET /v1/repo/metadata/", s.files("/v1/repo/metadata/", s.Repo.MetadataDir()))
	mux.Handle("GET /v1/repo/targets/", s.files("/v1/repo/targets/", s.Repo.TargetsDir()))
	mux.HandleFunc("POST "+api.PathEnroll, s.enroll)
	mux.HandleFunc("GET "+api.PathSelf, s.machineOnly(s.self))
	mux.HandleFunc("POST "+api.PathCheckIn, s.machineOnly(s.throttled(s.checkIn)))
	mux.HandleFunc("POST "+api.PathHealth, s.machineOnly(s.throttled(s.health)))
	// Each admin route: the least role allowed, and the action's name in
	// the audit log.
	admin := func(pattern, min, action string, h http.HandlerFunc) {
		mux.HandleFunc(pattern, s.authorize(min, action, h))
	}
	ro, op, ad := api.RoleReadOnly, api.RoleOperator, api.RoleAdmin
	admin("GET "+api.PathAdminKeys, ro, "list keys", s.listKeys)
	admin("POST "+api.PathAdminKeys, ad, "create key", s.createKey)
	admin("POST "+api.PathAdminKeys+"/{id}/revoke", ad, "revoke key", s.revokeKey)
	admin("GET /v1/admin/machines", ro, "list machines", s.listMachines)
	admin("DELETE "+api.PathAdminMachines+"{id}", ad, "delete machine", s.deleteMachine)
	admin("PUT /v1/admin/machines/{id}/group", op, "move machine", s.setGroup)
	admin("POST /v1/admin/patches", op, "rollout start", s.registerPatch)
	admin("POST /v1/admin/rollouts/{release}/{file}/{op}", op, "rollout", s.operate)
	admin("POST /v1/admin/rollouts/{name}/{op}", op, "rollout", s.operate)
	admin("GET /v1/admin/channels", ro, "list channels", s.channels)
	admin("PUT /v1/admin/channels/{name}", op, "set channel", s.putChannel)
	admin("GET /v1/admin/groups", ro, "list groups", s.groups)
	admin("PUT /v1/admin/groups/{name}", op, "set group", s.putGroup)
	admin("GET /v1/admin/reports/patches", ro, "report patches", s.reportPatches)
	admin("GET /v1/admin/reports/machines", ro, "report machines", s.reportMachines)
	admin("GET /v1/admin/reports/cves", ro, "report cves", s.reportCVEs)
	admin("GET "+api.PathAdminFixes, ro, "report fixes", s.reportFixes)
	admin("GET "+api.PathAdminLevels, ro, "report levels", s.reportLevels)
	admin("GET "+api.PathAdminOperators, ad, "list operators", s.listOperators)
	admin("POST "+api.PathAdminOperators, ad, "create operator", s.createOperator)
	admin("POST "+api.PathAdminOperators+"/{name}/revoke", ad, "revoke operator", s.revokeOperator)
	admin("GET "+api.PathAdminAudit, op, "read audit log", s.auditLog)
	admin("GET "+api.PathAdminWhoAmI, api.RoleMetrics, "who am I", s.whoAmI)
	admin("GET /metrics", api.RoleMetrics, "metrics", s.writeMetrics)
	s.consoleRoutes(mux)
	return s.metrics.instrument(jsonErrors(mux))
}

func hash(secret string) string { return bundle.SHA256Hex([]byte(secret)) }

// files serves the regular files under dir at prefix, never a directory
// listing (a directory is 404), with the download's longer write deadline.
func (s *Server) files(prefix, dir string) http.Handler {
	h := http.StripPrefix(prefix, http.FileServer(filesOnly{http.Dir(dir)}))
	timeout := s.Limits.withDefaults().DownloadTimeout
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Not supported by every ResponseWriter (a test's recorder): then
		// the server's write timeout, if any, stays.
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(timeout))
		h.ServeHTTP(w, r)
	})
}

// filesOnly opens regular files only: FileServer answers 404 for the
// rest, so directories are not listed.
type filesOnly struct{ fs http.FileSystem }

func (f filesOnly) Open(name string) (http.File, error) {
	file, err := f.fs.Open(name)
	if err != nil {
		return nil, err
	}
	fi, err := file.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		file.Close()
		return nil, fs.ErrNotExist
	}
	return file, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

var (
	hostnameRe = regexp.MustCompile(`^[A-Za-z0-9.-]{1,253}$`)
	nameRe     = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`) // channel and group names
)

func (s *Server) enroll(w http.ResponseWriter, r *http.Request) {
	var req api.EnrollRequest
	if !decode(w, r, &req) {
		s.refusedEnrollment(r, "bad_request", "", "", "malformed request")
		return
	}
	if req.Key == "" || !hostnameRe.MatchString(req.Hostname) || (req.Group != "" && !nameRe.MatchString(req.Group)) || (req.HostID != "" && !api.ValidHostID(req.HostID)) {
		s.refusedEnrollment(r, "bad_request", "", "", "a field is missing or malformed")
		fail(w, http.StatusBadRequest, `want {"key": enrollment key, "hostname": host name, "group": optional, the key's group, "host_id": optional, 32 to 64 lower-case hex digits}`)
		return
	}
	token := randomHex(32)
	m := store.Machine{ID: "m-" + randomHex(8), TokenHash: hash(token), Hostname: req.Hostname, Group: req.Group, HostID: req.HostID}
	k, err := s.Store.Enroll(r.Context(), hash(req.Key), m, s.now())
	refused := func(reason string) { s.refusedEnrollment(r, reason, k.ID, req.Hostname, err.Error()) }
	switch {
	case errors.Is(err, store.ErrGroupMismatch):
		refused("group")
		fail(w, http.StatusForbidden, fmt.Sprintf("%v: enroll without a group to join group %q, or ask the operator for a key of group %q", err, k.Group, req.Group))
		return
	case errors.Is(err, store.ErrUnknownGroup):
		refused("unknown_group")
		fail(w, http.StatusBadRequest, fmt.Sprintf("%v: the key's group no longer exists; ask the operator", err))
		return
	case errors.Is(err, store.ErrNotFound):
		refused("unknown_key")
		fail(w, http.StatusUnauthorized, "unknown enrollment key: check the key you were given")
		return
	case errors.Is(err, store.ErrLimit):
		refused("limit")
		fail(w, http.StatusForbidden, err.Error()+": the operator can delete a machine (`stitch fleet machines`, then `stitch fleet delete MACHINE`) or give you a key with a higher limit")
		return
	case errors.Is(err, store.ErrExpired), errors.Is(err, store.ErrRevoked):
		if errors.Is(err, store.ErrExpired) {
			refused("expired")
		} else {
			refused("revoked")
		}
		fail(w, http.StatusForbidden, err.Error()+": ask the operator for a new key")
		return
	case err != nil:
		s.internal(w, "enrollment", err)
		return
	}
	// A host enrolling again kept its record: read which one it is.
	got, err := s.Store.MachineByToken(r.Context(), m.TokenHash)
	if err != nil {
		s.internal(w, "enrollment", err)
		return
	}
	what := "enrolled"
	if got.ID != m.ID {
		what = "re-enrolled, the old token revoked"
	}
	s.log().Info(what, "machine", got.ID, "hostname", got.Hostname, "group", got.Group, "key", k.ID)
	reply(w, http.StatusCreated, api.EnrollResponse{MachineID: got.ID, Token: token})
}

func (s *Server) createKey(w http.ResponseWriter, r *http.Request) {
	var req api.KeyRequest
	if !decode(w, r, &req) {
		return
	}
	if req.MaxMachines < 0 || req.MaxMachines > 10_000_000 {
		fail(w, http.StatusBadRequest, "max_machines must be 0 (free tier) to 10000000")
		return
	}
	if req.Group == "" {
		req.Group = store.DefaultGroup
	}
	if req.MaxMachines == 0 {
		req.MaxMachines = FreeTierMachines
	}
	secret := "sk-" + randomHex(24)
	k := store.Key{ID: "k-" + randomHex(6), SecretHash: hash(secret), MaxMachines: req.MaxMachines, ExpiresAt: req.ExpiresAt, CreatedAt: s.now(), Group: req.Group}
	err := s.Store.CreateKey(r.Context(), k)
	switch {
	case errors.Is(err, store.ErrUnknownGroup):
		fail(w, http.StatusBadRequest, fmt.Sprintf("group %q does not exist: create it with PUT /v1/admin/groups/NAME", req.Group))
		return
	case err != nil:
		s.internal(w, "create key", err)
		return
	}
	log := []any{"key", k.ID, "group", k.Group, "max_machines", k.MaxMachines, "operator", actorOf(r.Context()).Name, "remote", remoteHost(r)}
	if !k.ExpiresAt.IsZero() {
		log = append(log, "expires_at", k.ExpiresAt.UTC().Format(time.RFC3339))
	}
	s.log().Info("enrollment key created", log...)
	reply(w, http.StatusCreated, api.KeyResponse{ID: k.ID, Key: secret, MaxMachines: k.MaxMachines, Group: k.Group})
}

func bearer(r *http.Request) string {
	t, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return ""
	}
	return t
}

// sameSecret says whether got hashes to want, in a time that depends on
// got's length only: comparing the secrets themselves with
// ConstantTimeCompare returns at once when the lengths differ, which
// tells a caller the secret's length.
func sameSecret(got string, want [sha256.Size]byte) bool {
	g := sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(g[:], want[:]) == 1
}

func (s *Server) machineOnly(h func(http.ResponseWriter, *http.Request, store.Machine)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		t := bearer(r)
		if t == "" {
			fail(w, http.StatusUnauthorized, "machine token required (Authorization: Bearer TOKEN from enrollment)")
			return
		}
		m, err := s.Store.MachineByToken(r.Context(), hash(t))
		if errors.Is(err, store.ErrNotFound) {
			fail(w, http.StatusUnauthorized, "unknown machine token: enroll again to get one")
			return
		}
		if err != nil {
			s.internal(w, "machine by token", err)
			return
		}
		h(w, r, m)
	}
}

// internal logs err and answers 500 without details.
func (s *Server) internal(w http.ResponseWriter, what string, err error) {
	s.log().Error(what, "err", err)
	fail(w, http.StatusInternalServerError, what+" failed on the server; try again later")
}

func (s *Server) log() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}

// decode reads one JSON object of at most maxBody bytes, refusing unknown
// fields, and answers 400/413 itself when it cannot.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	r.Body = http.MaxBytesReader(w, r.Body, maxBody)
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			fail(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body over %d bytes", maxBody))
			return false
		}
		fail(w, http.StatusBadRequest, "malformed JSON: "+err.Error())
		return false
	}
	if dec.More() {
		fail(w, http.StatusBadRequest, "malformed JSON: data after the object: send one JSON object")
		return false
	}
	return true
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code int, msg string) { reply(w, code, api.Error{Error: msg}) }

// Serve listens on addr until ctx ends.
func (s *Server) Serve(ctx context.Context, addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("serve %s: %w", addr, err)
	}
	return s.ServeListener(ctx, l)
}

// ServeListener serves on l (closing it) until ctx ends, within the
// server's Limits, and ticks the rollouts every 30 seconds.
func (s *Server) ServeListener(ctx context.Context, l net.Listener) error {
	if err := s.Limits.Validate(); err != nil {
		l.Close()
		return err
	}
	lim := s.Limits.withDefaults()
	srv := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: min(10*time.Second, lim.ReadTimeout),
		ReadTimeout:       lim.ReadTimeout,
		WriteTimeout:      lim.WriteTimeout,
		IdleTimeout:       lim.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(s.log().Handler(), slog.LevelWarn),
	}
	// The repository's metadata renews itself: the timestamp expires daily
	// and nothing else would re-sign it.
	go s.Repo.KeepFresh(ctx, time.Minute, s.log(), s.metrics.repoExpiry)
	go func() {
		t := time.NewTicker(30 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if err := s.Tick(ctx); err != nil {
					s.log().Error("rollout tick", "err", err)
				}
			}
		}
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	addr := l.Addr().String()
	ll := newLimitListener(l, lim.MaxConns)
	var err error
	if s.TLS != nil {
		// HTTP/1.1 only: with HTTP/2 one connection would carry hundreds
		// of requests at once, past what --max-conns bounds.
		var protos http.Protocols
		protos.SetHTTP1(true)
		srv.Protocols = &protos
		srv.TLSConfig = s.TLS.Clone()
		srv.TLSConfig.MinVersion = max(srv.TLSConfig.MinVersion, tls.VersionTLS12)
		srv.TLSConfig.NextProtos = []string{"http/1.1"}
		err = srv.ServeTLS(ll, "", "")
	} else {
		if !loopback(l.Addr()) {
			s.log().Warn("serving plain HTTP on a non-loopback address: tokens travel in clear; serve TLS (stitch server --tls-cert FILE --tls-key FILE) or put a TLS proxy in front", "listen", addr)
		}
		err = srv.Serve(ll)
	}
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve %s: %w", addr, err)
	}
	return nil
}
