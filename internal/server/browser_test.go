package server

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// browserMachines is the simulated fleet the browser test looks at.
const browserMachines = 3000

// TestConsoleInBrowser drives the console in headless Chromium (Debian's
// chromium package) over a simulated fleet of thousands of machines: log
// in, read the overview, filter and search the machines, open one, halt
// and resume a rollout with a reason, find both in the audit log; a
// read-only operator is shown no action and refused the audit log; a form
// whose CSRF token was taken out is refused. With STITCH_SCREENSHOTS=DIR
// it saves the main pages there as PNG (docs/console/).
func TestConsoleInBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a browser")
	}
	chrome, err := exec.LookPath("chromium")
	if err != nil {
		testutils.Unavailable(t, "no chromium to drive the console with: apt-get install chromium")
	}
	e := newEnv(t, func(s *Server) { s.Policy = onePolicy })
	seedFleet(t, e.st, browserMachines, time.Now())
	ctx := context.Background()
	admin := &api.Client{BaseURL: e.srv.URL, Token: e.admin}
	target := publish(t, e.repo, "stitch_fix", simBuildID, "CVE-2026-0001")
	if err := admin.Do(ctx, "POST", "/v1/admin/patches", api.PatchRequest{Target: target}, nil); err != nil {
		t.Fatal(err)
	}
	tokens := map[string]string{}
	for name, role := range map[string]string{"ops": api.RoleOperator, "viewer": api.RoleReadOnly} {
		var out api.OperatorResponse
		if err := admin.Do(ctx, "POST", api.PathAdminOperators, api.OperatorRequest{Name: name, Role: role}, &out); err != nil {
			t.Fatal(err)
		}
		tokens[name] = out.Token
	}

	actx, cancel := chromedp.NewExecAllocator(ctx, append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chrome), chromedp.NoSandbox, chromedp.WindowSize(1280, 900))...)
	defer cancel()
	bctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	bctx, cancel = context.WithTimeout(bctx, 3*time.Minute)
	defer cancel()
	shots := os.Getenv("STITCH_SCREENSHOTS")
	// do runs steps in the tab; shot saves the page as PNG when asked.
	do := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(bctx, steps...); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	shot := func(name string) {
		t.Helper()
		if shots == "" {
			return
		}
		png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
		if err == nil {
			err = os.WriteFile(filepath.Join(shots, name+".png"), png, 0o644)
		}
		if err != nil {
			t.Fatalf("screenshot %s: %v", name, err)
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(bctx, chromedp.Text(sel, chromedp.NodeVisible))
		if err != nil {
			t.Fatalf("read %s: %v", sel, err)
		}
		return strings.TrimSpace(s)
	}
	eval := func(js string) bool {
		t.Helper()
		b, err := chromedp.Run(bctx, chromedp.Evaluate[bool](js))
		if err != nil {
			t.Fatalf("evaluate %s: %v", js, err)
		}
		return b
	}
	login := func(token string) {
		t.Helper()
		do("log in", chromedp.Navigate(e.srv.URL+"/console/"), chromedp.WaitVisible("#token"),
			chromedp.SendKeys("#token", token), chromedp.Click("#login"), chromedp.WaitVisible("#who"))
	}

	login(tokens["ops"])
	shot("overview")
	if got := text("#who"); got != "ops (operator)" {
		t.Errorf("logged in as %q", got)
	}
	if got := text("#machines-total"); got != fmt.Sprint(browserMachines) {
		t.Errorf("overview: %s machines, want %d", got, browserMachines)
	}

	// Filter by kernel, page on, then search one host and open it.
	do("filter", chromedp.Navigate(e.srv.URL+"/console/machines"), chromedp.WaitVisible("#kernel"),
		chromedp.SetValue("#kernel", "6.12.117+deb12-amd64"), chromedp.Click("#filter"), chromedp.WaitVisible(`#csv[href*="kernel="]`))
	if got, want := text("#count"), fmt.Sprintf("%d machines, page 1 of %d", browserMachines/3, (browserMachines/3+49)/50); got != want {
		t.Errorf("kernel filter: %q, want %q", got, want)
	}
	do("next page", chromedp.Click("#next"), chromedp.WaitVisible("#prev"))
	shot("machines")
	if got := text("#count"); !strings.Contains(got, "page 2 of") {
		t.Errorf("next page: %q", got)
	}
	do("search", chromedp.Navigate(e.srv.URL+"/console/machines"), chromedp.WaitVisible("#search"),
		chromedp.SendKeys("#search", "web01234"), chromedp.Click("#filter"), chromedp.WaitVisible(`#csv[href*="q=web01234"]`))
	if got := text("#count"); got != "1 machines" {
		t.Errorf("search: %q", got)
	}
	do("open the machine", chromedp.Click("#machines tbody a"), chromedp.WaitVisible("dl.facts"))
	shot("machine")
	if got := text("#kernel"); !strings.HasPrefix(got, simRelease) {
		t.Errorf("machine web01234's kernel: %q", got)
	}

	// Halt, then resume, each with a reason and a confirmation.
	for _, op := range []struct{ name, reason, state string }{{"halt", "warnings on web00042", "halted"}, {"resume", "false alarm", "running"}} {
		do(op.name, chromedp.Navigate(e.srv.URL+"/console/patches/"+target), chromedp.WaitVisible("#reason-"+op.name),
			chromedp.SendKeys("#reason-"+op.name, op.reason), chromedp.Click("#confirm-"+op.name), chromedp.Click("#do-"+op.name),
			chromedp.WaitVisible("#flash"))
		if got := text("#flash"); !strings.Contains(got, op.state) {
			t.Errorf("%s: %q", op.name, got)
		}
		if got := text("#state"); !strings.HasPrefix(got, op.state) {
			t.Errorf("after %s the patch is %q", op.name, got)
		}
	}
	shot("patch")
	do("audit log", chromedp.Navigate(e.srv.URL+"/console/audit"), chromedp.WaitVisible("#audit"))
	shot("audit")
	log := text("#audit")
	for _, want := range []string{"rollout halt", "warnings on web00042", "rollout resume", "false alarm"} {
		if !strings.Contains(log, want) {
			t.Errorf("audit log lacks %q:\n%s", want, log)
		}
	}

	// A form whose CSRF token was taken out is refused.
	do("open the patch", chromedp.Navigate(e.srv.URL+"/console/patches/"+target), chromedp.WaitVisible("#form-halt"))
	if !eval(`(() => { document.querySelector('#form-halt input[name=csrf]').remove(); return true })()`) {
		t.Fatal("could not take the CSRF token out")
	}
	do("submit without the CSRF token", chromedp.SendKeys("#reason-halt", "no token"), chromedp.Click("#confirm-halt"),
		chromedp.Click("#do-halt"), chromedp.WaitVisible(".error"))
	if got := text(".error"); !strings.Contains(got, "CSRF") {
		t.Errorf("a form without its CSRF token: %q", got)
	}
	if p := e.patchState(t, target); p != "running" {
		t.Errorf("after the refused form the patch is %s, want running", p)
	}

	// The read-only operator sees no action and may not read the audit log.
	do("log out", chromedp.Click("#logout"), chromedp.WaitVisible("#token"))
	login(tokens["viewer"])
	do("viewer opens the patch", chromedp.Navigate(e.srv.URL+"/console/patches/"+target), chromedp.WaitVisible("#state"))
	if eval(`document.querySelector('#form-halt') !== null`) {
		t.Error("the read-only operator is shown the halt form")
	}
	do("viewer opens the audit log", chromedp.Navigate(e.srv.URL+"/console/audit"), chromedp.WaitVisible(".error"))
	if got := text(".error"); !strings.Contains(got, "needs role operator") {
		t.Errorf("read-only audit log: %q", got)
	}
}

// patchState reads a patch's rollout state through the API.
func (e *env) patchState(t *testing.T, target string) string {
	t.Helper()
	var ps []api.PatchReport
	if c := e.call(t, "GET", "/v1/admin/reports/patches", e.admin, nil, &ps); c != 200 {
		t.Fatalf("patches report: %d", c)
	}
	for _, p := range ps {
		if p.Target == target {
			return p.State
		}
	}
	return ""
}
