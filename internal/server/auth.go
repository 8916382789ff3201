package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// actor is who makes an admin request: the server's admin token (named
// "admin") or a named operator, with the role that decides what it may do.
type actor struct {
	Name string
	Role string
}

// rank orders roles: a role may do what every role of a lower rank may.
func rank(role string) int { return slices.Index(api.Roles, role) }

type actorKey struct{}

// actorOf is the actor authorize let through.
func actorOf(ctx context.Context) actor {
	a, _ := ctx.Value(actorKey{}).(actor)
	return a
}

// identify finds the actor a bearer token belongs to.
func (s *Server) identify(ctx context.Context, token string) (actor, error) {
	if token == "" {
		return actor{}, errors.New("a token is required (Authorization: Bearer TOKEN)")
	}
	if s.AdminToken != "" && sameSecret(token, s.adminSum) {
		return actor{Name: "admin", Role: api.RoleAdmin}, nil
	}
	o, err := s.Store.OperatorByToken(ctx, hash(token))
	switch {
	case errors.Is(err, store.ErrNotFound):
		return actor{}, errors.New("unknown token: ask an admin for an operator token (stitch fleet operator NAME --role ROLE)")
	case err != nil:
		return actor{}, err
	case !o.RevokedAt.IsZero():
		return actor{}, fmt.Errorf("the token of operator %s was revoked on %s", o.Name, o.RevokedAt.Format(time.RFC3339))
	}
	return actor{Name: o.Name, Role: o.Role}, nil
}

// authorize lets through the requests of actors whose role is at least
// min, and records every request that changes something (and every
// refusal of one) in the audit log as action.
func (s *Server) authorize(min, action string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		a, err := s.identify(r.Context(), bearer(r))
		if err != nil {
			fail(w, http.StatusUnauthorized, err.Error())
			return
		}
		s.serveAs(w, r, a, min, action, h)
	}
}

// serveAs runs h for a (already authenticated) when its role allows, and
// audits what changes state.
func (s *Server) serveAs(w http.ResponseWriter, r *http.Request, a actor, min, action string, h http.HandlerFunc) {
	if op := r.PathValue("op"); op != "" { // "rollout halt"
		action += " " + op
	}
	changes := r.Method != http.MethodGet && r.Method != http.MethodHead
	var body []byte
	if changes {
		body, _ = io.ReadAll(io.LimitReader(r.Body, maxBody+1))
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
	if rank(a.Role) < rank(min) {
		fail(sw, http.StatusForbidden, fmt.Sprintf("%s (role %s) may not %s: that needs role %s or above", a.Name, a.Role, action, min))
	} else {
		h(sw, r.WithContext(context.WithValue(r.Context(), actorKey{}, a)))
	}
	if changes || sw.code == http.StatusForbidden {
		s.audit(r, a, action, auditDetail(body), sw.code)
	}
}

// secretField matches JSON fields that must never reach the audit log.
var secretField = regexp.MustCompile(`"(token|key|password|secret)"\s*:\s*"[^"]*"`)

// auditDetail is a request body as the audit log keeps it: short, and
// without secrets.
func auditDetail(body []byte) string {
	d := strings.TrimSpace(secretField.ReplaceAllString(string(body), `"$1":"…"`))
	if len(d) > 512 {
		d = d[:512] + "…"
	}
	return d
}

func (s *Server) audit(r *http.Request, a actor, action, detail string, status int) {
	e := store.AuditEntry{At: s.now(), ID: randomHex(8), Actor: a.Name, Action: action,
		Target: strings.TrimPrefix(r.URL.Path, "/v1/admin/"), Detail: detail, Remote: r.RemoteAddr, Status: status}
	if err := s.Store.Audit(context.WithoutCancel(r.Context()), e); err != nil {
		s.log().Error("audit log", "err", err, "actor", a.Name, "action", action)
	}
	s.log().Info("operator action", "actor", a.Name, "role", a.Role, "action", action, "target", e.Target, "status", status)
}

var operatorName = regexp.MustCompile(`^[a-z][a-z0-9._-]{0,63}$`)

func (s *Server) createOperator(w http.ResponseWriter, r *http.Request) {
	var req api.OperatorRequest
	if !decode(w, r, &req) {
		return
	}
	if !operatorName.MatchString(req.Name) || req.Name == "admin" {
		fail(w, http.StatusBadRequest, fmt.Sprintf("operator name %q: want 1 to 64 of a-z, 0-9, . _ - starting with a letter, not \"admin\"", req.Name))
		return
	}
	if rank(req.Role) < 0 {
		fail(w, http.StatusBadRequest, fmt.Sprintf("role %q: want one of %s", req.Role, strings.Join(api.Roles, ", ")))
		return
	}
	token := "so_" + randomHex(24)
	o := store.Operator{Name: req.Name, Role: req.Role, TokenHash: hash(token), CreatedAt: s.now()}
	switch err := s.Store.CreateOperator(r.Context(), o); {
	case errors.Is(err, store.ErrExists):
		fail(w, http.StatusConflict, fmt.Sprintf("operator %s exists (revoke it and choose another name for a new token)", req.Name))
		return
	case err != nil:
		s.internal(w, "create operator", err)
		return
	}
	reply(w, http.StatusOK, api.OperatorResponse{Operator: apiOperator(o), Token: token})
}

func apiOperator(o store.Operator) api.Operator {
	return api.Operator{Name: o.Name, Role: o.Role, CreatedAt: o.CreatedAt, RevokedAt: o.RevokedAt}
}

func (s *Server) listOperators(w http.ResponseWriter, r *http.Request) {
	os, err := s.Store.Operators(r.Context())
	if err != nil {
		s.internal(w, "operators", err)
		return
	}
	out := []api.Operator{}
	for _, o := range os {
		out = append(out, apiOperator(o))
	}
	reply(w, http.StatusOK, out)
}

func (s *Server) revokeOperator(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	switch err := s.Store.RevokeOperator(r.Context(), name, s.now()); {
	case errors.Is(err, store.ErrNotFound):
		fail(w, http.StatusNotFound, fmt.Sprintf("no operator %s", name))
		return
	case err != nil:
		s.internal(w, "revoke operator", err)
		return
	}
	o, err := s.Store.OperatorByName(r.Context(), name)
	if err != nil {
		s.internal(w, "revoke operator", err)
		return
	}
	reply(w, http.StatusOK, apiOperator(o))
}

func (s *Server) whoAmI(w http.ResponseWriter, r *http.Request) {
	a := actorOf(r.Context())
	reply(w, http.StatusOK, api.OperatorRequest{Name: a.Name, Role: a.Role})
}

// auditLog answers GET /v1/admin/audit?actor=A&before=RFC3339&limit=N.
func (s *Server) auditLog(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := 100
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			fail(w, http.StatusBadRequest, fmt.Sprintf("limit %q: want 1 to 1000", v))
			return
		}
		limit = n
	}
	var before time.Time
	if v := q.Get("before"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			fail(w, http.StatusBadRequest, fmt.Sprintf("before %q: want RFC 3339", v))
			return
		}
		before = t
	}
	es, err := s.Store.AuditLog(r.Context(), q.Get("actor"), before, limit)
	if err != nil {
		s.internal(w, "audit log", err)
		return
	}
	out := []api.AuditEntry{}
	for _, e := range es {
		out = append(out, api.AuditEntry{At: e.At, Actor: e.Actor, Action: e.Action, Target: e.Target, Detail: e.Detail, Remote: e.Remote, Status: e.Status})
	}
	reply(w, http.StatusOK, out)
}
