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
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
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

	once    sync.Once
	metrics *metrics
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
	s.once.Do(func() { s.metrics = newMetrics() })
	mux := http.NewServeMux()
	mux.Handle("GET /v1/repo/metadata/", http.StripPrefix("/v1/repo/metadata/", http.FileServer(http.Dir(s.Repo.MetadataDir()))))
	mux.Handle("GET /v1/repo/targets/", http.StripPrefix("/v1/repo/targets/", http.FileServer(http.Dir(s.Repo.TargetsDir()))))
	mux.HandleFunc("POST "+api.PathEnroll, s.enroll)
	mux.HandleFunc("GET "+api.PathSelf, s.machineOnly(s.self))
	mux.HandleFunc("POST "+api.PathCheckIn, s.machineOnly(s.checkIn))
	mux.HandleFunc("POST "+api.PathHealth, s.machineOnly(s.health))
	mux.HandleFunc("POST /v1/admin/keys", s.adminOnly(s.createKey))
	mux.HandleFunc("POST /v1/admin/patches", s.adminOnly(s.registerPatch))
	mux.HandleFunc("POST /v1/admin/rollouts/{release}/{file}/{op}", s.adminOnly(s.operate))
	mux.HandleFunc("GET /v1/admin/channels", s.adminOnly(s.channels))
	mux.HandleFunc("PUT /v1/admin/channels/{name}", s.adminOnly(s.putChannel))
	mux.HandleFunc("GET /v1/admin/groups", s.adminOnly(s.groups))
	mux.HandleFunc("PUT /v1/admin/groups/{name}", s.adminOnly(s.putGroup))
	mux.HandleFunc("PUT /v1/admin/machines/{id}/group", s.adminOnly(s.setGroup))
	mux.HandleFunc("GET /v1/admin/reports/patches", s.adminOnly(s.reportPatches))
	mux.HandleFunc("GET /v1/admin/reports/machines", s.adminOnly(s.reportMachines))
	mux.HandleFunc("GET /v1/admin/reports/cves", s.adminOnly(s.reportCVEs))
	mux.HandleFunc("GET /metrics", s.adminOnly(s.writeMetrics))
	return s.metrics.instrument(mux)
}

func hash(secret string) string { return bundle.SHA256Hex([]byte(secret)) }

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
		return
	}
	if req.Key == "" || !hostnameRe.MatchString(req.Hostname) || (req.Group != "" && !nameRe.MatchString(req.Group)) {
		fail(w, http.StatusBadRequest, "want {\"key\": enrollment key, \"hostname\": host name, \"group\": optional group name}")
		return
	}
	token := randomHex(32)
	m := store.Machine{ID: "m-" + randomHex(8), TokenHash: hash(token), Hostname: req.Hostname, Group: req.Group}
	k, err := s.Store.Enroll(r.Context(), hash(req.Key), m, s.now())
	switch {
	case errors.Is(err, store.ErrUnknownGroup):
		fail(w, http.StatusBadRequest, fmt.Sprintf("group %q does not exist: ask the operator for the group name, or enroll without one", req.Group))
	case errors.Is(err, store.ErrNotFound):
		fail(w, http.StatusUnauthorized, "unknown enrollment key: check the key you were given")
	case errors.Is(err, store.ErrLimit):
		fail(w, http.StatusForbidden, err.Error()+": remove a machine or use a key with a higher limit")
	case errors.Is(err, store.ErrExpired):
		fail(w, http.StatusForbidden, err.Error()+": ask for a new key")
	case err != nil:
		s.log().Error("enroll", "err", err)
		fail(w, http.StatusInternalServerError, "enrollment failed")
	default:
		group := m.Group
		if group == "" {
			group = k.Group
		}
		s.log().Info("enrolled", "machine", m.ID, "hostname", m.Hostname, "group", group, "key", k.ID)
		reply(w, http.StatusCreated, api.EnrollResponse{MachineID: m.ID, Token: token})
	}
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
	reply(w, http.StatusCreated, api.KeyResponse{ID: k.ID, Key: secret, MaxMachines: k.MaxMachines, Group: k.Group})
}

func bearer(r *http.Request) string {
	t, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return ""
	}
	return t
}

func (s *Server) adminOnly(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		t := bearer(r)
		if s.AdminToken == "" || subtle.ConstantTimeCompare([]byte(t), []byte(s.AdminToken)) != 1 {
			fail(w, http.StatusUnauthorized, "admin token required (Authorization: Bearer TOKEN)")
			return
		}
		h(w, r)
	}
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
	srv := &http.Server{Addr: addr, Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
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
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve %s: %w", addr, err)
	}
	return nil
}
