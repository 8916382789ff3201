package api

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
)

// serve answers every request with code and body, on loopback.
func serve(t *testing.T, code int, body string) *Client {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tok" {
			w.WriteHeader(http.StatusUnauthorized)
			w.Write([]byte(`{"error":"machine token required"}`))
			return
		}
		w.WriteHeader(code)
		w.Write([]byte(body))
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return &Client{BaseURL: "http://" + l.Addr().String(), Token: "tok"}
}

func TestClientStatusErrors(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		code int
		want error
	}{{401, ErrUnauthorized}, {403, ErrForbidden}, {400, ErrBadRequest}, {404, ErrBadRequest}, {413, ErrBadRequest}} {
		c := serve(t, tc.code, `{"error":"the reason"}`)
		err := c.Health(ctx, Health{})
		var se *StatusError
		if !errors.Is(err, tc.want) || !errors.As(err, &se) || se.Code != tc.code || se.Message != "the reason" {
			t.Errorf("%d: %v", tc.code, err)
		}
	}
	c := serve(t, 500, "plain text")
	err := c.Health(ctx, Health{})
	if errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), "plain text") {
		t.Errorf("500: %v", err)
	}
	c.Token = "wrong"
	if _, err := c.Self(ctx); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("wrong token: %v", err)
	}
}

func TestClientDecodesAndLimits(t *testing.T) {
	ctx := context.Background()
	c := serve(t, 200, `{"actions":[{"target":"6.1/a-0123456789abcdef.stitch","name":"a","op":"apply"}],"next_checkin_seconds":60}`)
	r, err := c.CheckIn(ctx, CheckIn{})
	if err != nil || len(r.Actions) != 1 || r.Actions[0].Op != OpApply || r.NextCheckinSeconds != 60 {
		t.Fatalf("check-in: %+v %v", r, err)
	}
	c = serve(t, 200, `{"id":"`+strings.Repeat("x", MaxResponse)+`"}`)
	if _, err := c.Self(ctx); err == nil || !strings.Contains(err.Error(), "answer over") {
		t.Errorf("huge answer: %v", err)
	}
	c = &Client{BaseURL: "http://127.0.0.1:1", HTTP: &http.Client{Timeout: time.Second}}
	if _, err := c.Enroll(ctx, EnrollRequest{}); err == nil || !strings.Contains(err.Error(), "POST /v1/machines") {
		t.Errorf("network error without context: %v", err)
	}
}

func TestValidate(t *testing.T) {
	now := time.Now()
	good := CheckIn{KernelRelease: "6.1.0-54-amd64", KernelBuildID: "887cd47f03581c5b", AgentVersion: "0.1",
		Patches: []PatchState{{Target: "6.1.0-54-amd64/stitch_fix-0123456789abcdef.stitch", Name: "stitch_fix", State: contract.StateApplied, Since: now}}}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*CheckIn){
		"release":  func(c *CheckIn) { c.KernelRelease = "a b" },
		"build-id": func(c *CheckIn) { c.KernelBuildID = "XYZ" },
		"target":   func(c *CheckIn) { c.Patches[0].Target = "../../etc/passwd" },
		"state":    func(c *CheckIn) { c.Patches[0].State = "maybe" },
	} {
		c := good
		c.Patches = append([]PatchState(nil), good.Patches...)
		mut(&c)
		if c.Validate() == nil {
			t.Errorf("%s accepted", name)
		}
	}
	sched := contract.DefaultSchedule
	h := Health{Target: good.Patches[0].Target, Name: "stitch_fix", Check: "5m", Healthy: false}
	if h.Validate(sched) == nil {
		t.Error("unhealthy report without a reason accepted")
	}
	h.Reason = contract.ReasonOops
	if err := h.Validate(sched); err != nil {
		t.Error(err)
	}
	// A check is valid only on the server's schedule.
	if err := h.Validate(contract.NewSchedule(time.Second)); err == nil {
		t.Error("check 5m accepted by a server whose schedule is only 1s")
	}
}

// FuzzValidate feeds the server's request validation arbitrary bodies: it
// must never panic, and what it accepts must survive a round trip.
func FuzzValidate(f *testing.F) {
	f.Add([]byte(`{"kernel_release":"6.1.0-54-amd64","kernel_build_id":"887cd47f","agent_version":"1","patches":[{"target":"6.1/a-0123456789abcdef.stitch","name":"a","state":"applied","since":"2026-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"target":"6.1/a-0123456789abcdef.stitch","name":"a","check":"5m","healthy":false,"reason":"oops"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var c CheckIn
		if json.Unmarshal(data, &c) == nil && c.Validate() == nil {
			b, _ := json.Marshal(c)
			var again CheckIn
			if err := json.Unmarshal(b, &again); err != nil || again.Validate() != nil {
				t.Fatalf("accepted check-in does not survive a round trip: %v", err)
			}
		}
		var h Health
		if json.Unmarshal(data, &h) == nil && h.Validate(contract.DefaultSchedule) == nil && !h.Healthy && h.Reason == "" {
			t.Fatal("unhealthy report without a reason accepted")
		}
	})
}

// The largest check-in Validate accepts must fit the server's body limit.
func TestLargestCheckInFits(t *testing.T) {
	c := CheckIn{KernelRelease: strings.Repeat("r", 64), KernelBuildID: strings.Repeat("a", 128), AgentVersion: strings.Repeat("v", 64)}
	for range MaxPatches {
		c.Patches = append(c.Patches, PatchState{Target: strings.Repeat("r", 64) + "/" + strings.Repeat("n", 55) + "-0123456789abcdef.stitch",
			Name: strings.Repeat("n", 55), State: contract.StateApplied, Since: time.Now(), Reason: strings.Repeat("x", 1024)})
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if b, _ := json.Marshal(c); len(b) > MaxRequest {
		t.Fatalf("the largest valid check-in is %d bytes, over MaxRequest %d", len(b), MaxRequest)
	}
}

// A 429 is its own error, not a bad request (the request may be sent
// again), and carries the server's Retry-After.
func TestClientRateLimited(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(http.StatusTooManyRequests)
		w.Write([]byte(`{"error":"slow down"}`))
	})}
	go srv.Serve(l)
	defer srv.Close()
	c := &Client{BaseURL: "http://" + l.Addr().String(), Token: "tok"}
	err = c.Health(context.Background(), Health{})
	var se *StatusError
	if !errors.Is(err, ErrRateLimited) || errors.Is(err, ErrBadRequest) || !errors.As(err, &se) || se.RetryAfter != 7*time.Second {
		t.Fatalf("429: %v (%+v)", err, se)
	}
}
