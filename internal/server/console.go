package server

import (
	"bytes"
	"cmp"
	"crypto/subtle"
	"embed"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/server/api"
	"github.com/stitchpatch/stitch/internal/server/rollout"
	"github.com/stitchpatch/stitch/internal/server/store"
)

// The operator's console: server-rendered pages (html/template, no
// JavaScript) over the same data and the same actions as the admin API.
// An operator logs in with their token; the session is a cookie
// (HttpOnly, SameSite=Strict, Secure over TLS) and every form carries the
// session's CSRF token. Actions go through the API's handlers, so roles
// and the audit log apply as they do to the CLI.

//go:embed console
var consoleFiles embed.FS

const (
	sessionCookie = "stitch_session"
	sessionLife   = 12 * time.Hour
	machinesPage  = 50 // machines per page
)

// view is what every page template gets.
type view struct {
	Title  string
	Nav    string // the menu entry to highlight
	Actor  actor
	CSRF   string
	Flash  string // the result of the last action
	Now    time.Time
	Data   any
	Errors []string
}

// Can says whether the viewer's role is at least role (for templates).
func (v *view) Can(role string) bool { return rank(v.Actor.Role) >= rank(role) }

// consolePages parses every page with the layout.
func consolePages() (map[string]*template.Template, error) {
	funcs := template.FuncMap{
		"date": func(t time.Time) string {
			if t.IsZero() {
				return "-"
			}
			return t.UTC().Format("2006-01-02 15:04")
		},
		"ago": func(now, t time.Time) string {
			if t.IsZero() {
				return "never"
			}
			return now.Sub(t).Round(time.Minute).String() + " ago"
		},
		"pct":   func(f float64) string { return strconv.FormatFloat(100*f, 'f', 0, 64) + "%" },
		"short": shortHex,
		"join":  strings.Join,
		// query and sortq build a link's query from url.Values: encoded
		// already, so the template must not encode it again.
		"query": func(base url.Values, kv ...string) template.URL {
			q := url.Values{}
			for k, v := range base {
				q[k] = v
			}
			for i := 0; i+1 < len(kv); i += 2 {
				q.Set(kv[i], kv[i+1])
			}
			return template.URL(q.Encode())
		},
		"add":  func(a, b int) int { return a + b },
		"list": func(s ...string) []string { return s },
		// sortq is the query that sorts by col: ascending, or descending
		// when it is sorted by col ascending already.
		"sortq": func(base url.Values, col, cur string, desc bool) template.URL {
			q := url.Values{}
			for k, v := range base {
				q[k] = v
			}
			q.Del("page")
			q.Set("sort", col)
			if (cur == col || cur == "" && col == "hostname") && !desc {
				q.Set("desc", "1")
			} else {
				q.Del("desc")
			}
			return template.URL(q.Encode())
		},
	}
	pages, err := fs.Glob(consoleFiles, "console/*.html")
	if err != nil {
		return nil, err
	}
	out := map[string]*template.Template{}
	for _, p := range pages {
		name := strings.TrimSuffix(strings.TrimPrefix(p, "console/"), ".html")
		if name == "layout" {
			continue
		}
		t, err := template.New(name).Funcs(funcs).ParseFS(consoleFiles, "console/layout.html", p)
		if err != nil {
			return nil, fmt.Errorf("console page %s: %w", name, err)
		}
		out[name] = t
	}
	return out, nil
}

func shortHex(s string) string { return s[:min(12, len(s))] }

// consoleRoutes adds the console to mux.
func (s *Server) consoleRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/console/", http.StatusSeeOther)
	})
	mux.HandleFunc("GET /console/console.css", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/css; charset=utf-8")
		b, _ := consoleFiles.ReadFile("console/console.css")
		w.Write(b)
	})
	mux.HandleFunc("GET /console/login", s.loginPage)
	mux.HandleFunc("POST /console/login", s.login)
	ro, op, ad := api.RoleReadOnly, api.RoleOperator, api.RoleAdmin
	page := func(pattern, min string, h func(http.ResponseWriter, *http.Request, *view)) {
		mux.HandleFunc(pattern, s.session(min, h))
	}
	page("POST /console/logout", ro, s.logout)
	page("GET /console/{$}", ro, s.overviewPage)
	page("GET /console/machines", ro, s.machinesPage)
	page("GET /console/machines.csv", ro, s.machinesCSV)
	page("GET /console/machines/{id}", ro, s.machinePage)
	page("GET /console/patches", ro, s.patchesPage)
	page("GET /console/patches/{release}/{file}", ro, s.patchPage)
	page("POST /console/patches/{release}/{file}/{op}", op, s.patchAction)
	page("GET /console/cves", ro, s.cvesPage)
	page("GET /console/channels", ro, s.channelsPage)
	page("GET /console/keys", ro, s.keysPage)
	page("POST /console/keys", ad, s.createKeyAction)
	page("POST /console/keys/{id}/revoke", ad, s.revokeKeyAction)
	page("GET /console/audit", op, s.auditPage)
}

// render writes a page; a template error is the server's fault.
func (s *Server) render(w http.ResponseWriter, code int, name string, v *view) {
	t := s.pages[name]
	var b bytes.Buffer
	if t == nil {
		s.internal(w, "console page "+name, errors.New("no such template"))
		return
	}
	if err := t.ExecuteTemplate(&b, "layout", v); err != nil {
		s.internal(w, "console page "+name, err)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'")
	w.Header().Set("X-Frame-Options", "DENY")
	w.Header().Set("Referrer-Policy", "same-origin")
	w.WriteHeader(code)
	w.Write(b.Bytes())
}

func (s *Server) loginPage(w http.ResponseWriter, r *http.Request) {
	s.render(w, http.StatusOK, "login", &view{Title: "Log in", Now: s.now(), Flash: r.URL.Query().Get("msg")})
}

// login trades an operator token for a session.
func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 4096)
	token := strings.TrimSpace(r.PostFormValue("token"))
	a, err := s.identify(r.Context(), token)
	if err != nil {
		if token != "" {
			s.audit(r, actor{Name: "unknown"}, "console login", "", http.StatusUnauthorized)
		}
		s.render(w, http.StatusUnauthorized, "login", &view{Title: "Log in", Now: s.now(), Errors: []string{err.Error()}})
		return
	}
	id, csrf := randomHex(32), randomHex(32)
	if err := s.Store.CreateSession(r.Context(), store.Session{IDHash: hash(id), Operator: a.Name, CSRF: csrf, ExpiresAt: s.now().Add(sessionLife)}); err != nil {
		s.internal(w, "login", err)
		return
	}
	s.audit(r, a, "console login", "", http.StatusOK)
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: id, Path: "/", HttpOnly: true, Secure: r.TLS != nil,
		SameSite: http.SameSiteStrictMode, MaxAge: int(sessionLife / time.Second)})
	http.Redirect(w, r, "/console/", http.StatusSeeOther)
}

func (s *Server) logout(w http.ResponseWriter, r *http.Request, v *view) {
	if c, err := r.Cookie(sessionCookie); err == nil {
		s.Store.DeleteSession(r.Context(), hash(c.Value), s.now())
	}
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: "", Path: "/", HttpOnly: true, MaxAge: -1, SameSite: http.SameSiteStrictMode})
	http.Redirect(w, r, "/console/login?msg=logged+out", http.StatusSeeOther)
}

// session serves h for a logged-in operator whose role is at least min;
// a form must carry the session's CSRF token.
func (s *Server) session(min string, h func(http.ResponseWriter, *http.Request, *view)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		a, se, err := s.sessionActor(r)
		if err != nil {
			http.Redirect(w, r, "/console/login?msg="+url.QueryEscape(err.Error()), http.StatusSeeOther)
			return
		}
		v := &view{Actor: a, CSRF: se.CSRF, Now: s.now(), Flash: r.URL.Query().Get("msg")}
		if r.Method == http.MethodPost {
			r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
			if got := r.PostFormValue("csrf"); subtle.ConstantTimeCompare([]byte(got), []byte(se.CSRF)) != 1 {
				s.audit(r, a, "console form without its CSRF token", "", http.StatusForbidden)
				v.Title, v.Errors = "Refused", []string{"this form lacks the session's CSRF token: reload the page and try again"}
				s.render(w, http.StatusForbidden, "error", v)
				return
			}
		}
		if rank(a.Role) < rank(min) {
			if r.Method == http.MethodPost {
				s.audit(r, a, "console "+r.URL.Path, "", http.StatusForbidden)
			}
			v.Title = "Not allowed"
			v.Errors = []string{fmt.Sprintf("%s (role %s) may not see or do this: it needs role %s or above", a.Name, a.Role, min)}
			s.render(w, http.StatusForbidden, "error", v)
			return
		}
		h(w, r, v)
	}
}

// sessionActor is the operator of the request's session cookie.
func (s *Server) sessionActor(r *http.Request) (actor, store.Session, error) {
	c, err := r.Cookie(sessionCookie)
	if err != nil || c.Value == "" {
		return actor{}, store.Session{}, errors.New("log in with your operator token")
	}
	se, err := s.Store.Session(r.Context(), hash(c.Value), s.now())
	if err != nil {
		return actor{}, store.Session{}, errors.New("your session ended: log in again")
	}
	if se.Operator == "admin" {
		return actor{Name: "admin", Role: api.RoleAdmin}, se, nil
	}
	o, err := s.Store.OperatorByName(r.Context(), se.Operator)
	if err != nil || !o.RevokedAt.IsZero() {
		return actor{}, store.Session{}, errors.New("your operator token was revoked")
	}
	return actor{Name: o.Name, Role: o.Role}, se, nil
}

// callAPI runs an admin API handler for a console action, as a, so that
// the API's checks, roles and audit log apply; it returns the answer's
// status and, for an error, its message.
func (s *Server) callAPI(r *http.Request, a actor, min, action, method, path string, values map[string]string, body any, h http.HandlerFunc, out any) (int, string) {
	var rd *bytes.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	} else {
		rd = bytes.NewReader(nil)
	}
	req, err := http.NewRequestWithContext(r.Context(), method, path, rd)
	if err != nil {
		return http.StatusInternalServerError, err.Error()
	}
	req.RemoteAddr = r.RemoteAddr
	for k, v := range values {
		req.SetPathValue(k, v)
	}
	rec := &recorder{header: http.Header{}, code: http.StatusOK}
	s.serveAs(rec, req, a, min, action, h)
	if method != http.MethodGet && rec.code < 400 {
		s.forgetFigures()
	}
	if rec.code >= 400 {
		var e api.Error
		json.Unmarshal(rec.body.Bytes(), &e)
		return rec.code, e.Error
	}
	if out != nil {
		json.Unmarshal(rec.body.Bytes(), out)
	}
	return rec.code, ""
}

// recorder keeps an API handler's answer for callAPI.
type recorder struct {
	header http.Header
	code   int
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header         { return r.header }
func (r *recorder) Write(b []byte) (int, error) { return r.body.Write(b) }
func (r *recorder) WriteHeader(code int)        { r.code = code }

// overview is the fleet at a glance.
type overview struct {
	Machines, Stale, Unsupported, Never int
	Kernels                             []store.KernelCount
	Rollouts                            map[string]int // by state
	Active                              []api.PatchReport
	Exposed                             []api.CVEReport // CVEs with exposed or not-covered machines, most first
	ExposedMachines                     int
	At                                  time.Time // when the figures were computed
}

func (s *Server) overviewPage(w http.ResponseWriter, r *http.Request, v *view) {
	f, err := s.figures(r)
	if err != nil {
		s.internal(w, "overview", err)
		return
	}
	o := overview{Kernels: f.Kernels, Rollouts: map[string]int{}, At: f.At}
	for _, k := range f.Kernels {
		o.Machines += k.Machines
		o.Stale += k.Stale
		o.Unsupported += k.Unsupported
		if k.Release == "" {
			o.Never += k.Machines
		}
	}
	for _, p := range f.Patches {
		o.Rollouts[p.State]++
		if p.State == "running" || p.State == "halted" {
			o.Active = append(o.Active, p)
		}
	}
	exposed := map[string]bool{}
	for _, c := range f.CVEs {
		if len(c.Exposed)+c.NotCoveredMachines > 0 {
			o.Exposed = append(o.Exposed, c)
		}
		for _, m := range c.Exposed {
			exposed[m] = true
		}
	}
	o.ExposedMachines = len(exposed)
	v.Title, v.Nav, v.Data = "Fleet", "fleet", o
	s.render(w, http.StatusOK, "overview", v)
}

// cveReports is the CVE report of the whole fleet, most exposed first.
func (s *Server) cveReports(r *http.Request, ms []store.Machine) ([]api.CVEReport, error) {
	f, cs, err := s.coverageInputs(r, ms)
	if err != nil {
		return nil, err
	}
	out := cveReports(f.patches, cs, f.machines, f.applied)
	slices.SortStableFunc(out, func(a, b api.CVEReport) int {
		return cmp.Compare(len(b.Exposed)+b.NotCoveredMachines, len(a.Exposed)+a.NotCoveredMachines)
	})
	return out, nil
}

// machineList is one page of machines and how to get the others.
type machineList struct {
	Machines              []store.Machine
	Total, Page, Pages    int
	Query                 url.Values // the filters, for links
	Search, Kernel, Group string
	State, Sort           string
	Desc                  bool
	Kernels               []store.KernelCount
	Groups                []store.Group
	States                []string
	StaleBefore           time.Time
}

// machineQuery reads the machines filters from the URL.
func (s *Server) machineQuery(r *http.Request) (store.MachineQuery, url.Values, error) {
	q := r.URL.Query()
	mq := store.MachineQuery{Search: q.Get("q"), Kernel: q.Get("kernel"), Group: q.Get("group"), State: q.Get("state"),
		Sort: q.Get("sort"), Desc: q.Get("desc") == "1", StaleBefore: s.silentBefore(s.now())}
	if _, ok := store.MachineSorts[mq.Sort]; mq.Sort != "" && !ok {
		return mq, q, fmt.Errorf("sort %q: want hostname, kernel, group or last_checkin", mq.Sort)
	}
	if mq.State != "" && !slices.Contains(store.MachineStates, mq.State) {
		return mq, q, fmt.Errorf("state %q: want one of %s", mq.State, strings.Join(store.MachineStates, ", "))
	}
	keep := url.Values{}
	for _, k := range []string{"q", "kernel", "group", "state", "sort", "desc"} {
		if q.Get(k) != "" {
			keep.Set(k, q.Get(k))
		}
	}
	return mq, keep, nil
}

func (s *Server) machinesPage(w http.ResponseWriter, r *http.Request, v *view) {
	mq, keep, err := s.machineQuery(r)
	page, _ := strconv.Atoi(r.URL.Query().Get("page"))
	page = max(page, 1)
	mq.Limit, mq.Offset = machinesPage, (page-1)*machinesPage
	var ms []store.Machine
	total := 0
	if err == nil {
		ms, total, err = s.Store.MachinesPage(r.Context(), mq)
	}
	l := machineList{Machines: ms, Total: total, Page: page, Pages: max(1, (total+machinesPage-1)/machinesPage), Query: keep,
		Search: mq.Search, Kernel: mq.Kernel, Group: mq.Group, State: mq.State, Sort: mq.Sort, Desc: mq.Desc, States: store.MachineStates, StaleBefore: mq.StaleBefore}
	if err != nil {
		v.Errors = append(v.Errors, err.Error())
	}
	// One GROUP BY, not the fleet figures: a plain list must not pay for
	// the CVE report.
	if l.Kernels, err = s.Store.KernelCounts(r.Context(), mq.StaleBefore); err != nil {
		s.internal(w, "machines", err)
		return
	}
	if l.Groups, err = s.Store.Groups(r.Context()); err != nil {
		s.internal(w, "machines", err)
		return
	}
	v.Title, v.Nav, v.Data = "Machines", "machines", l
	s.render(w, http.StatusOK, "machines", v)
}

// machinesCSV exports every machine the filters select.
func (s *Server) machinesCSV(w http.ResponseWriter, r *http.Request, v *view) {
	mq, _, err := s.machineQuery(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	ms, _, err := s.Store.MachinesPage(r.Context(), mq)
	if err != nil {
		s.internal(w, "machines", err)
		return
	}
	w.Header().Set("Content-Type", "text/csv; charset=utf-8")
	w.Header().Set("Content-Disposition", `attachment; filename="machines.csv"`)
	cw := csv.NewWriter(w)
	cw.Write([]string{"id", "hostname", "group", "channel", "kernel_release", "kernel_build_id", "agent_version", "last_checkin", "stale", "unsupported"})
	for _, m := range ms {
		stale := !m.LastCheckIn.IsZero() && m.LastCheckIn.Before(mq.StaleBefore)
		last := ""
		if !m.LastCheckIn.IsZero() {
			last = m.LastCheckIn.Format(time.RFC3339)
		}
		cw.Write([]string{m.ID, csvSafe(m.Hostname), m.Group, m.Channel, m.KernelRelease, m.KernelBuildID, csvSafe(m.AgentVersion), last, strconv.FormatBool(stale), csvSafe(m.Unsupported)})
	}
	cw.Flush()
}

// csvSafe keeps a machine-reported string from being taken for a formula
// by a spreadsheet.
func csvSafe(s string) string {
	if s != "" && strings.ContainsRune("=+-@\t\r", rune(s[0])) {
		return "'" + s
	}
	return s
}

// machineDetail is one machine's page.
type machineDetail struct {
	Machine store.Machine
	Stale   bool
	Patches []store.MachinePatch
	Health  []store.HealthReport
	Missing []string // registered patches for its kernel it does not hold (levels included)
	Exposed []string // CVEs a published patch fixes that it is exposed to
}

func (s *Server) machinePage(w http.ResponseWriter, r *http.Request, v *view) {
	ctx := r.Context()
	m, err := s.Store.MachineByID(ctx, r.PathValue("id"))
	if errors.Is(err, store.ErrNotFound) {
		v.Title, v.Errors = "No such machine", []string{fmt.Sprintf("no machine %q", r.PathValue("id"))}
		s.render(w, http.StatusNotFound, "error", v)
		return
	}
	if err != nil {
		s.internal(w, "machine", err)
		return
	}
	d := machineDetail{Machine: m, Stale: !m.LastCheckIn.IsZero() && m.LastCheckIn.Before(s.silentBefore(s.now()))}
	if d.Patches, err = s.Store.MachinePatches(ctx, m.ID); err != nil {
		s.internal(w, "machine", err)
		return
	}
	if d.Health, err = s.Store.HealthReports(ctx, "", m.ID, 100); err != nil {
		s.internal(w, "machine", err)
		return
	}
	// Its coverage from the fleet-wide figures: the patches for its
	// kernel it does not hold, and the CVEs it is exposed to.
	f, err := s.figures(r)
	if err != nil {
		s.internal(w, "machine", err)
		return
	}
	applied := map[string]bool{}
	for _, p := range d.Patches {
		applied[p.Target] = p.State == contract.StateApplied
	}
	for _, p := range f.Patches {
		if p.KernelRelease == m.KernelRelease && p.KernelBuildID == m.KernelBuildID && !applied[p.Target] && !rollout.State(p.State).Reverts() {
			d.Missing = append(d.Missing, p.Target)
		}
	}
	for _, c := range f.CVEs {
		if slices.Contains(c.Exposed, m.ID) {
			d.Exposed = append(d.Exposed, c.CVE)
		}
	}
	v.Title, v.Nav, v.Data = m.Hostname, "machines", d
	s.render(w, http.StatusOK, "machine", v)
}

func (s *Server) patchesPage(w http.ResponseWriter, r *http.Request, v *view) {
	f, err := s.figures(r)
	if err != nil {
		s.internal(w, "patches", err)
		return
	}
	v.Title, v.Nav, v.Data = "Patches and levels", "patches", f.Patches
	s.render(w, http.StatusOK, "patches", v)
}

// patchDetail is one patch's page: its rollout and every health report.
type patchDetail struct {
	Report api.PatchReport
	Stages []float64
	Checks []string
	Health []store.HealthReport
}

func (s *Server) patchPage(w http.ResponseWriter, r *http.Request, v *view) {
	target := r.PathValue("release") + "/" + r.PathValue("file")
	f, err := s.figures(r)
	if err != nil {
		s.internal(w, "patch", err)
		return
	}
	ps := f.Patches
	d := patchDetail{Stages: s.policy().Stages}
	for _, c := range s.schedule() {
		d.Checks = append(d.Checks, c.Name)
	}
	found := false
	for _, p := range ps {
		if p.Target == target {
			d.Report, found = p, true
		}
	}
	if !found {
		v.Title, v.Errors = "No such patch", []string{fmt.Sprintf("patch %s is not registered", target)}
		s.render(w, http.StatusNotFound, "error", v)
		return
	}
	if d.Health, err = s.Store.HealthReports(r.Context(), target, "", 500); err != nil {
		s.internal(w, "patch", err)
		return
	}
	v.Title, v.Nav, v.Data = d.Report.Name, "patches", d
	s.render(w, http.StatusOK, "patch", v)
}

// patchAction halts, resumes or blocklists a rollout from the console:
// the operator gives a reason and confirms.
func (s *Server) patchAction(w http.ResponseWriter, r *http.Request, v *view) {
	release, file, op := r.PathValue("release"), r.PathValue("file"), r.PathValue("op")
	back := "/console/patches/" + release + "/" + file
	reason := strings.TrimSpace(r.PostFormValue("reason"))
	var msg string
	switch {
	case reason == "":
		msg = op + " not done: give a reason (it is kept with the rollout and in the audit log)"
	case r.PostFormValue("confirm") != "yes":
		msg = op + " not done: tick the confirmation"
	default:
		var out api.PatchReport
		code, e := s.callAPI(r, v.Actor, api.RoleOperator, "rollout", "POST", "/v1/admin/rollouts/"+release+"/"+file+"/"+op,
			map[string]string{"release": release, "file": file, "op": op}, api.RolloutRequest{Reason: reason}, s.operate, &out)
		if code >= 400 {
			msg = fmt.Sprintf("%s refused: %s", op, e)
		} else {
			msg = fmt.Sprintf("%s: %s at stage %d", op, out.State, out.Stage)
		}
	}
	http.Redirect(w, r, back+"?msg="+url.QueryEscape(msg), http.StatusSeeOther)
}

func (s *Server) cvesPage(w http.ResponseWriter, r *http.Request, v *view) {
	f, err := s.figures(r)
	if err != nil {
		s.internal(w, "cves", err)
		return
	}
	v.Title, v.Nav, v.Data = "CVEs", "cves", f.CVEs
	s.render(w, http.StatusOK, "cves", v)
}

// channelState is a channel with its groups, and for each running
// rollout when the channel offers it and why not yet.
type channelState struct {
	Channel store.Channel
	Groups  []store.Group
	Waits   []channelWait
}

type channelWait struct {
	Target string
	Offers time.Time // when the delay has passed
	Why    string    // why the channel does not offer it now, "" if it does
}

func (s *Server) channelsPage(w http.ResponseWriter, r *http.Request, v *view) {
	ctx := r.Context()
	cs, err := s.Store.Channels(ctx)
	if err != nil {
		s.internal(w, "channels", err)
		return
	}
	gs, err := s.Store.Groups(ctx)
	if err != nil {
		s.internal(w, "channels", err)
		return
	}
	ps, err := s.Store.Patches(ctx)
	if err != nil {
		s.internal(w, "channels", err)
		return
	}
	now := s.now()
	var out []channelState
	for _, c := range cs {
		st := channelState{Channel: c}
		for _, g := range gs {
			if g.Channel == c.Name {
				st.Groups = append(st.Groups, g)
			}
		}
		for _, p := range ps {
			if p.State != "running" {
				continue
			}
			wt := channelWait{Target: p.Target, Offers: p.RegisteredAt.Add(c.Delay)}
			switch {
			case !c.Cutoff.IsZero() && p.RegisteredAt.After(c.Cutoff):
				wt.Why = fmt.Sprintf("registered after the channel's cutoff (%s): never offered here", c.Cutoff.Format(time.RFC3339))
			case now.Before(wt.Offers):
				wt.Why = fmt.Sprintf("the channel's delay of %s has %s to run", c.Delay, wt.Offers.Sub(now).Round(time.Minute))
			}
			st.Waits = append(st.Waits, wt)
		}
		out = append(out, st)
	}
	v.Title, v.Nav, v.Data = "Channels and groups", "channels", out
	s.render(w, http.StatusOK, "channels", v)
}

// keyList is the keys page; NewKey is shown once, after creating one.
type keyList struct {
	Keys   []store.KeyInfo
	NewKey *api.KeyResponse
	Groups []store.Group
}

func (s *Server) keysPage(w http.ResponseWriter, r *http.Request, v *view) {
	s.renderKeys(w, r, v, nil)
}

func (s *Server) renderKeys(w http.ResponseWriter, r *http.Request, v *view, created *api.KeyResponse) {
	ks, err := s.Store.Keys(r.Context())
	if err != nil {
		s.internal(w, "keys", err)
		return
	}
	gs, err := s.Store.Groups(r.Context())
	if err != nil {
		s.internal(w, "keys", err)
		return
	}
	v.Title, v.Nav, v.Data = "Enrollment keys", "keys", keyList{Keys: ks, NewKey: created, Groups: gs}
	s.render(w, http.StatusOK, "keys", v)
}

// createKeyAction shows the new key on the answer itself, never in a URL.
func (s *Server) createKeyAction(w http.ResponseWriter, r *http.Request, v *view) {
	n, err := strconv.Atoi(r.PostFormValue("max_machines"))
	if err != nil || n < 1 {
		v.Errors = append(v.Errors, fmt.Sprintf("machines %q: want a number of at least 1", r.PostFormValue("max_machines")))
		s.renderKeys(w, r, v, nil)
		return
	}
	var out api.KeyResponse
	code, msg := s.callAPI(r, v.Actor, api.RoleAdmin, "create key", "POST", api.PathAdminKeys, nil,
		api.KeyRequest{MaxMachines: n, Group: r.PostFormValue("group")}, s.createKey, &out)
	if code >= 400 {
		v.Errors = append(v.Errors, "key not created: "+msg)
		s.renderKeys(w, r, v, nil)
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	s.renderKeys(w, r, v, &out)
}

func (s *Server) revokeKeyAction(w http.ResponseWriter, r *http.Request, v *view) {
	id := r.PathValue("id")
	msg := "key " + id + " revoked: it enrolls nothing more"
	if r.PostFormValue("confirm") != "yes" {
		msg = "revoke not done: tick the confirmation"
	} else if code, e := s.callAPI(r, v.Actor, api.RoleAdmin, "revoke key", "POST", api.PathAdminKeys+"/"+id+"/revoke",
		map[string]string{"id": id}, nil, s.revokeKey, nil); code >= 400 {
		msg = "revoke refused: " + e
	}
	http.Redirect(w, r, "/console/keys?msg="+url.QueryEscape(msg), http.StatusSeeOther)
}

// auditList is a page of the audit log and the link to the next.
type auditList struct {
	Entries []store.AuditEntry
	Actor   string
	Next    string // the before= of the next page, "" at the end
}

func (s *Server) auditPage(w http.ResponseWriter, r *http.Request, v *view) {
	q := r.URL.Query()
	var before time.Time
	if b := q.Get("before"); b != "" {
		t, err := time.Parse(time.RFC3339Nano, b)
		if err != nil {
			v.Errors = append(v.Errors, fmt.Sprintf("before %q: want RFC 3339", b))
		}
		before = t
	}
	const n = 100
	es, err := s.Store.AuditLog(r.Context(), q.Get("actor"), before, n)
	if err != nil {
		s.internal(w, "audit", err)
		return
	}
	l := auditList{Entries: es, Actor: q.Get("actor")}
	if len(es) == n {
		l.Next = es[n-1].At.Format(time.RFC3339Nano)
	}
	v.Title, v.Nav, v.Data = "Audit log", "audit", l
	s.render(w, http.StatusOK, "audit", v)
}

// listMachines answers GET /v1/admin/machines with a page of machines,
// filtered and sorted as the console's list is.
func (s *Server) listMachines(w http.ResponseWriter, r *http.Request) {
	mq, _, err := s.machineQuery(r)
	if err == nil {
		mq.Limit, mq.Offset, err = pageArgs(r.URL.Query())
	}
	if err != nil {
		fail(w, http.StatusBadRequest, err.Error())
		return
	}
	ms, total, err := s.Store.MachinesPage(r.Context(), mq)
	if err != nil {
		s.internal(w, "machines", err)
		return
	}
	out := api.MachinePage{Total: total, Offset: mq.Offset, Machines: []api.MachineSummary{}}
	for _, m := range ms {
		out.Machines = append(out.Machines, api.MachineSummary{ID: m.ID, Hostname: m.Hostname, KeyID: m.KeyID, Group: m.Group, Channel: m.Channel,
			KernelRelease: m.KernelRelease, KernelBuildID: m.KernelBuildID, AgentVersion: m.AgentVersion, LastCheckIn: m.LastCheckIn,
			Stale: !m.LastCheckIn.IsZero() && m.LastCheckIn.Before(mq.StaleBefore), Unsupported: m.Unsupported})
	}
	reply(w, http.StatusOK, out)
}

// pageArgs reads limit (1 to 1000, default 100) and offset.
func pageArgs(q url.Values) (limit, offset int, err error) {
	limit = 100
	if v := q.Get("limit"); v != "" {
		if limit, err = strconv.Atoi(v); err != nil || limit < 1 || limit > 1000 {
			return 0, 0, fmt.Errorf("limit %q: want 1 to 1000", v)
		}
	}
	if v := q.Get("offset"); v != "" {
		if offset, err = strconv.Atoi(v); err != nil || offset < 0 {
			return 0, 0, fmt.Errorf("offset %q: want 0 or more", v)
		}
	}
	return limit, offset, nil
}
