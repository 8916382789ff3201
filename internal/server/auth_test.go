package server

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/server/api"
)

// Named operator tokens: each role may do what its rank allows and no
// more; a revoked token stops at once; every change and every refusal is
// in the audit log under the operator's name, without secrets.
func TestOperatorRolesAndAudit(t *testing.T) {
	s, repo := newServer(t, Limits{})
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()
	ctx := context.Background()
	admin := &api.Client{BaseURL: hs.URL, Token: s.AdminToken}
	tokens := map[string]string{}
	for _, role := range api.Roles {
		var out api.OperatorResponse
		name := strings.ReplaceAll(role, "-", "") + "1"
		if err := admin.Do(ctx, "POST", api.PathAdminOperators, api.OperatorRequest{Name: name, Role: role}, &out); err != nil {
			t.Fatal(err)
		}
		if out.Token == "" || out.Role != role {
			t.Fatalf("create %s: %+v", role, out)
		}
		tokens[role] = out.Token
	}
	target := publish(t, repo, "stitch_fix", simBuildID)
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
		t.Fatal(err)
	}
	as := func(role string) *api.Client { return &api.Client{BaseURL: hs.URL, Token: tokens[role]} }
	for _, c := range []struct {
		role, method, path string
		body               any
		code               int
	}{
		{api.RoleMetrics, "GET", "/metrics", nil, 0},
		{api.RoleMetrics, "GET", "/v1/admin/reports/machines", nil, http.StatusForbidden},
		{api.RoleReadOnly, "GET", "/v1/admin/reports/machines", nil, 0},
		{api.RoleReadOnly, "GET", "/metrics", nil, 0},
		{api.RoleReadOnly, "POST", "/v1/admin/rollouts/stitch_fix/halt", api.RolloutRequest{Reason: "looks bad"}, http.StatusForbidden},
		{api.RoleReadOnly, "GET", api.PathAdminAudit, nil, http.StatusForbidden},
		{api.RoleOperator, "POST", "/v1/admin/rollouts/stitch_fix/halt", api.RolloutRequest{Reason: "looks bad"}, 0},
		{api.RoleOperator, "POST", api.PathAdminKeys, api.KeyRequest{}, http.StatusForbidden},
		{api.RoleOperator, "POST", api.PathAdminOperators, api.OperatorRequest{Name: "eve", Role: api.RoleAdmin}, http.StatusForbidden},
		{api.RoleAdmin, "POST", api.PathAdminKeys, api.KeyRequest{}, 0},
	} {
		var raw []byte
		err := as(c.role).Do(ctx, c.method, c.path, c.body, &raw)
		var se *api.StatusError
		switch {
		case c.code == 0 && err != nil && !strings.Contains(err.Error(), "decode answer"): // metrics are text
			t.Errorf("%s %s %s: %v, want it allowed", c.role, c.method, c.path, err)
		case c.code != 0 && (!errors.As(err, &se) || se.Code != c.code):
			t.Errorf("%s %s %s: %v, want %d", c.role, c.method, c.path, err, c.code)
		}
	}
	if err := admin.Do(ctx, "POST", api.PathAdminOperators+"/operator1/revoke", nil, nil); err != nil {
		t.Fatal(err)
	}
	var se *api.StatusError
	if err := as(api.RoleOperator).Do(ctx, "GET", "/v1/admin/reports/machines", nil, nil); !errors.As(err, &se) || se.Code != http.StatusUnauthorized || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("revoked token: %v, want 401 saying it was revoked", err)
	}
	var log []api.AuditEntry
	if err := admin.Do(ctx, "GET", api.PathAdminAudit+"?limit=50", nil, &log); err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, e := range log {
		seen[e.Actor+" "+e.Action+" "+http.StatusText(e.Status)]++
		if strings.Contains(e.Detail, "so_") {
			t.Errorf("a token in the audit log: %+v", e)
		}
	}
	for _, want := range []string{
		"admin create operator OK", "readonly1 rollout halt Forbidden", "operator1 rollout halt OK",
		"operator1 create key Forbidden", "admin revoke operator OK", "metrics1 report machines Forbidden",
	} {
		if seen[want] == 0 {
			t.Errorf("audit log has no %q: %v", want, seen)
		}
	}
	for _, e := range log {
		if e.Actor == "operator1" && e.Action == "rollout halt" && (!strings.Contains(e.Detail, "looks bad") || e.Target != "rollouts/stitch_fix/halt") {
			t.Errorf("halt's entry: %+v, want the reason and the patch", e)
		}
	}
}
