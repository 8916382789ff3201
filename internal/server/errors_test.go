package server

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/server/api"
)

// Every error answer is JSON, also from no route, a wrong method and a
// missing repository file; successful answers pass untouched.
func TestErrorsAreJSON(t *testing.T) {
	s, _ := newServer(t, Limits{})
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()
	for _, c := range []struct {
		method, path string
		code         int
		want         string
	}{
		{"GET", "/favicon.ico", http.StatusNotFound, "not found: GET /favicon.ico"},
		{"GET", "/v1/nope", http.StatusNotFound, "not found: GET /v1/nope"},
		{"DELETE", "/metrics", http.StatusMethodNotAllowed, "Method Not Allowed"},
		{"GET", "/v1/repo/targets/6.1.0-54-amd64/missing.stitch", http.StatusNotFound, "not found"},
		{"GET", "/v1/admin/keys", http.StatusUnauthorized, ""},
	} {
		req, _ := http.NewRequest(c.method, hs.URL+c.path, nil)
		resp, err := hs.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var e api.Error
		err = json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != c.code || err != nil || e.Error == "" || !strings.Contains(e.Error, c.want) ||
			resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s %s: %d %s, error %q (%v); want %d and a JSON error containing %q", c.method, c.path, resp.StatusCode, resp.Header.Get("Content-Type"), e.Error, err, c.code, c.want)
		}
		if c.code == http.StatusMethodNotAllowed && resp.Header.Get("Allow") == "" {
			t.Errorf("%s %s: no Allow header", c.method, c.path)
		}
	}
	resp, err := hs.Client().Get(hs.URL + "/v1/repo/metadata/1.root.json")
	if err != nil {
		t.Fatal(err)
	}
	var root map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&root); err != nil || resp.StatusCode != http.StatusOK || root["signed"] == nil {
		t.Errorf("GET root: %d, %v", resp.StatusCode, err)
	}
	resp.Body.Close()
}
