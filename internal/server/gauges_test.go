package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// metricsText reads /metrics with the admin token.
func (e *env) metricsText(t *testing.T) string {
	t.Helper()
	req, _ := http.NewRequest("GET", e.srv.URL+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+e.admin)
	resp, err := e.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("/metrics: %d %s", resp.StatusCode, b)
	}
	return string(b)
}

// logLines are the JSON log records whose msg is msg.
func logLines(logs *syncBuffer, msg string) []map[string]any {
	var out []map[string]any
	for _, l := range strings.Split(logs.String(), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(l), &rec) == nil && rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

// The fleet gauges of /metrics (enrolled, stale past two check-in
// intervals, never checked in, unsupported, patches by state), the refused enrollments by
// reason, and the log of key creation, revocation, machine deletion and
// refused enrollments with their fields.
func TestFleetGaugesAndAdminLogs(t *testing.T) {
	clk := &fakeClock{t: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
	var logs syncBuffer
	e := newEnv(t, func(s *Server) {
		s.Now, s.CheckInEvery = clk.Now, time.Hour
		s.Log = slog.New(slog.NewJSONHandler(&logs, nil))
	})
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	ms := e.enroll(t, 4, "") // a key of 4 machines
	unsupported := api.CheckIn{KernelRelease: simRelease, KernelBuildID: simBuildID, AgentVersion: "t", Unsupported: "no CONFIG_LIVEPATCH"}
	checkIn(t, ms[0])
	checkIn(t, ms[1])
	if _, err := ms[2].CheckIn(ctx, unsupported); err != nil {
		t.Fatal(err)
	}
	// ms[3] never checks in. Three hours on, ms[0] checks in again: ms[1]
	// and ms[2] are silent past two intervals.
	clk.Add(3 * time.Hour)
	checkIn(t, ms[0])
	// A patch for their kernel fixes a CVE: the two machines on it that
	// can live-patch and the unsupported one are exposed until they
	// apply it.
	target := publish(t, e.repo, "stitch_fix", simBuildID, "CVE-2026-7777")
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
		t.Fatal(err)
	}
	body := e.metricsText(t)
	for _, want := range []string{
		"\nstitch_machines 4\n", "\nstitch_machines_stale 2\n", "\nstitch_machines_never_checked_in 1\n", "\nstitch_machines_unsupported 1\n",
		"# TYPE stitch_machines_stale gauge", `stitch_rollouts{state="running"} 1`,
		"\nstitch_cves_exposed 1\n", "\nstitch_machines_exposed 3\n",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}

	keys := logLines(&logs, "enrollment key created")
	if len(keys) != 1 || keys[0]["key"] == "" || keys[0]["group"] != store.DefaultGroup || keys[0]["max_machines"] != float64(4) || keys[0]["remote"] != "127.0.0.1" || keys[0]["operator"] != "admin" || keys[0]["level"] != "INFO" {
		t.Errorf("key creation logged as %v", keys)
	}
	keyID := keys[0]["key"]
	var key api.KeyResponse
	if err := admin.Do(ctx, "POST", "/v1/admin/keys", api.KeyRequest{MaxMachines: 1, ExpiresAt: clk.Now().Add(time.Hour)}, &key); err != nil {
		t.Fatal(err)
	}
	if l := logLines(&logs, "enrollment key created"); len(l) != 2 || l[1]["expires_at"] != "2026-03-01T04:00:00Z" {
		t.Errorf("a key with an expiry logged as %v", l)
	}

	// Refused enrollments: an unknown key, a full key, an expired key, a
	// bad request. Never the secret in the log.
	var full api.KeyResponse
	admin.Do(ctx, "POST", "/v1/admin/keys", api.KeyRequest{MaxMachines: 1}, &full)
	c := &api.Client{BaseURL: e.srv.URL}
	if _, err := c.Enroll(ctx, api.EnrollRequest{Key: full.Key, Hostname: "first"}); err != nil {
		t.Fatal(err)
	}
	for _, r := range []api.EnrollRequest{{Key: "sk-wrong", Hostname: "a"}, {Key: full.Key, Hostname: "second"}, {Key: "x", Hostname: "bad host"}} {
		if _, err := c.Enroll(ctx, r); err == nil {
			t.Fatalf("%+v enrolled", r)
		}
	}
	clk.Add(2 * time.Hour)
	if _, err := c.Enroll(ctx, api.EnrollRequest{Key: key.Key, Hostname: "late"}); err == nil {
		t.Fatal("an expired key enrolled")
	}
	refused := logLines(&logs, "enrollment refused")
	byReason := map[string]map[string]any{}
	for _, r := range refused {
		byReason[fmt.Sprint(r["reason"])] = r
		if r["remote"] != "127.0.0.1" || r["level"] != "WARN" || r["why"] == "" {
			t.Errorf("refused enrollment logged without its remote address, level or reason: %v", r)
		}
	}
	if r := byReason["unknown_key"]; r == nil || r["key"] != nil || r["hostname"] != "a" {
		t.Errorf("unknown key logged as %v", r)
	}
	if r := byReason["limit"]; r == nil || r["key"] != full.ID || r["hostname"] != "second" || !strings.Contains(fmt.Sprint(r["why"]), "limit") {
		t.Errorf("full key logged as %v", r)
	}
	if r := byReason["expired"]; r == nil || r["key"] != key.ID {
		t.Errorf("expired key logged as %v", r)
	}
	if r := byReason["bad_request"]; r == nil || r["hostname"] != nil {
		t.Errorf("bad request logged as %v", r)
	}
	for _, secret := range []string{full.Key, key.Key, "sk-wrong"} {
		if strings.Contains(logs.String(), secret) {
			t.Errorf("an enrollment key's secret %q is in the log", secret)
		}
	}
	body = e.metricsText(t)
	for _, reason := range []string{"unknown_key", "limit", "expired", "bad_request"} {
		if want := fmt.Sprintf("stitch_enrollments_refused_total{reason=%q} 1\n", reason); !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	// Revocation and deletion, with who asked (the remote address).
	if err := admin.Do(ctx, "POST", fmt.Sprintf("/v1/admin/keys/%s/revoke", keyID), api.RevokeRequest{}, nil); err != nil {
		t.Fatal(err)
	}
	if l := logLines(&logs, "enrollment key revoked"); len(l) != 1 || l[0]["key"] != keyID || l[0]["machines_deleted"] != float64(0) || l[0]["remote"] != "127.0.0.1" || l[0]["operator"] != "admin" {
		t.Errorf("revocation logged as %v", l)
	}
	var me api.MachineView
	if err := ms[3].Do(ctx, "GET", api.PathSelf, nil, &me); err != nil {
		t.Fatal(err)
	}
	if err := admin.Do(ctx, "DELETE", api.PathAdminMachines+me.ID, nil, nil); err != nil {
		t.Fatal(err)
	}
	if l := logLines(&logs, "machine deleted"); len(l) != 1 || l[0]["machine"] != me.ID || l[0]["remote"] != "127.0.0.1" || l[0]["operator"] != "admin" {
		t.Errorf("deletion logged as %v", l)
	}
	// 4 + "first" less the deleted one; stale (silent since the cut two
	// hours ago): ms[1], ms[2], not ms[0] (checked in at the cut); never
	// checked in: "first" (ms[3] is gone).
	if body := e.metricsText(t); !strings.Contains(body, "\nstitch_machines 4\n") || !strings.Contains(body, "\nstitch_machines_stale 2\n") || !strings.Contains(body, "\nstitch_machines_never_checked_in 1\n") {
		t.Errorf("after a deletion:\n%s", body)
	}
}

// A flood of refused enrollments is logged at most refusedLogMax times
// a minute; the next minute's first line says how many were left out.
func TestRefusedEnrollmentLogBounded(t *testing.T) {
	clk := &fakeClock{t: time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)}
	var logs syncBuffer
	e := newEnv(t, func(s *Server) {
		s.Now = clk.Now
		s.Log = slog.New(slog.NewJSONHandler(&logs, nil))
	})
	c := &api.Client{BaseURL: e.srv.URL}
	for range refusedLogMax + 40 {
		c.Enroll(context.Background(), api.EnrollRequest{Key: "sk-nope", Hostname: "h"})
	}
	if n := len(logLines(&logs, "enrollment refused")); n != refusedLogMax {
		t.Fatalf("%d refusals logged in a minute, want %d", n, refusedLogMax)
	}
	clk.Add(time.Minute)
	c.Enroll(context.Background(), api.EnrollRequest{Key: "sk-nope", Hostname: "h"})
	if l := logLines(&logs, "refused enrollments not logged (over the log limit)"); len(l) != 1 || l[0]["count"] != float64(40) {
		t.Fatalf("left-out refusals logged as %v", l)
	}
	if n := len(logLines(&logs, "enrollment refused")); n != refusedLogMax+1 {
		t.Fatalf("%d refusals logged, want %d", n, refusedLogMax+1)
	}
	if !strings.Contains(e.metricsText(t), fmt.Sprintf("stitch_enrollments_refused_total{reason=\"unknown_key\"} %d\n", refusedLogMax+41)) {
		t.Error("the refusals left out of the log are not counted in the metrics")
	}
}
