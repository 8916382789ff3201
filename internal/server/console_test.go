package server

import (
	"context"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/server/api"
)

// consoleUser is a browser without JavaScript: a cookie jar that logs in
// with a token and submits forms.
type consoleUser struct {
	t    *testing.T
	base string
	c    *http.Client
	csrf string
}

func newConsoleUser(t *testing.T, e *env, token string) *consoleUser {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	u := &consoleUser{t: t, base: e.srv.URL, c: &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
	if code, _, loc := u.post("/console/login", url.Values{"token": {token}}); code != http.StatusSeeOther || loc != "/console/" {
		t.Fatalf("login: %d to %q", code, loc)
	}
	_, body := u.get("/console/")
	m := regexp.MustCompile(`name="csrf" value="([0-9a-f]+)"`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no CSRF token on the overview:\n%s", body)
	}
	u.csrf = m[1]
	return u
}

func (u *consoleUser) get(path string) (int, string) {
	u.t.Helper()
	resp, err := u.c.Get(u.base + path)
	if err != nil {
		u.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (u *consoleUser) post(path string, form url.Values) (int, string, string) {
	u.t.Helper()
	resp, err := u.c.PostForm(u.base+path, form)
	if err != nil {
		u.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header.Get("Location")
}

// Every page renders for a logged-in operator; a form needs the CSRF
// token; a read-only operator sees the pages but may not act; a halt
// needs a reason and a confirmation and lands in the audit log.
func TestConsolePagesAndActions(t *testing.T) {
	e := newEnv(t, func(s *Server) { s.Policy = onePolicy })
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	ms := e.enroll(t, 3, "")
	for _, m := range ms {
		checkIn(t, m)
	}
	target := publish(t, e.repo, "stitch_fix", simBuildID, "CVE-2026-0001")
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
		t.Fatal(err)
	}
	var viewer api.OperatorResponse
	if err := admin.Do(ctx, "POST", api.PathAdminOperators, api.OperatorRequest{Name: "viewer", Role: api.RoleReadOnly}, &viewer); err != nil {
		t.Fatal(err)
	}

	resp, err := (&http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}).Get(e.srv.URL + "/console/machines")
	if err != nil || resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(resp.Header.Get("Location"), "/console/login") {
		t.Fatalf("no session: %v %v", err, resp)
	}
	u := newConsoleUser(t, e, e.admin)
	for path, want := range map[string]string{
		"/console/":                     `id="machines-total">3<`,
		"/console/machines":             "3 machines",
		"/console/machines?q=zzz":       "0 machines",
		"/console/machines?sort=kernel": "3 machines",
		"/console/patches":              "stitch_fix",
		"/console/patches/" + target:    "running",
		"/console/cves":                 "CVE-2026-0001",
		"/console/channels":             "canary",
		"/console/keys":                 "of 3",
		"/console/audit":                "create operator",
	} {
		code, body := u.get(path)
		if code != http.StatusOK || !strings.Contains(body, want) {
			t.Errorf("GET %s: %d, want 200 with %q:\n%s", path, code, want, body)
		}
	}
	// Links keep the filters: sorting and paging links are real queries.
	if _, body := u.get("/console/machines?kernel=" + url.QueryEscape(simRelease) + "&q=h"); !strings.Contains(body, `href="?kernel=`+url.QueryEscape(simRelease)+`&amp;q=h&amp;sort=kernel"`) {
		t.Errorf("the kernel sort link loses the filters:\n%s", body)
	}
	// A machine's page: the patch for its kernel is missing, its CVE
	// exposed.
	self, _ := ms[0].Self(ctx)
	if _, body := u.get("/console/machines/" + self.ID); !strings.Contains(body, target) || !strings.Contains(body, `class="bad">CVE-2026-0001`) {
		t.Errorf("machine page lacks the missing patch or the exposed CVE:\n%s", body)
	}
	if code, body := u.get("/console/machines.csv"); code != http.StatusOK || strings.Count(body, "\n") != 4 {
		t.Errorf("CSV: %d\n%s", code, body)
	}

	halt := "/console/patches/" + target + "/halt"
	if code, _, _ := u.post(halt, url.Values{"reason": {"x"}, "confirm": {"yes"}}); code != http.StatusForbidden {
		t.Errorf("a form without the CSRF token: %d, want 403", code)
	}
	if _, _, loc := u.post(halt, url.Values{"csrf": {u.csrf}, "confirm": {"yes"}}); !strings.Contains(loc, "give+a+reason") {
		t.Errorf("halt without a reason: redirected to %q", loc)
	}
	if _, _, loc := u.post(halt, url.Values{"csrf": {u.csrf}, "reason": {"x"}}); !strings.Contains(loc, "confirmation") {
		t.Errorf("halt without confirming: redirected to %q", loc)
	}
	if _, _, loc := u.post(halt, url.Values{"csrf": {u.csrf}, "reason": {"kernel warnings on web1"}, "confirm": {"yes"}}); !strings.Contains(loc, "halted") {
		t.Errorf("halt: redirected to %q", loc)
	}
	if _, body := u.get("/console/patches/" + target); !strings.Contains(body, "kernel warnings on web1") {
		t.Errorf("the halt's reason is not on the patch page")
	}

	v := newConsoleUser(t, e, viewer.Token)
	if _, body := v.get("/console/patches/" + target); strings.Contains(body, `id="form-resume"`) {
		t.Error("a read-only operator is shown the action forms")
	}
	if code, _, _ := v.post("/console/patches/"+target+"/resume", url.Values{"csrf": {v.csrf}, "reason": {"x"}, "confirm": {"yes"}}); code != http.StatusForbidden {
		t.Errorf("read-only resume: %d, want 403", code)
	}
	if code, body := v.get("/console/audit"); code != http.StatusForbidden || !strings.Contains(body, "needs role operator") {
		t.Errorf("read-only audit log: %d, want 403", code)
	}
	var log []api.AuditEntry
	admin.Do(ctx, "GET", api.PathAdminAudit, nil, &log)
	found := map[string]bool{}
	for _, l := range log {
		found[l.Actor+" "+l.Action+" "+http.StatusText(l.Status)] = true
	}
	for _, want := range []string{"admin rollout halt OK", "admin console login OK", "viewer console /console/patches/" + target + "/resume Forbidden", "admin console form without its CSRF token Forbidden"} {
		if !found[want] {
			t.Errorf("audit log lacks %q: %v", want, found)
		}
	}
	anon := &consoleUser{t: t, base: e.srv.URL, c: &http.Client{}}
	if code, body, _ := anon.post("/console/login", url.Values{"token": {"wrong"}}); code != http.StatusUnauthorized || !strings.Contains(body, "unknown token") {
		t.Errorf("login with a wrong token: %d", code)
	}
}
