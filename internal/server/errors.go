package server

import (
	"bytes"
	"fmt"
	"net/http"
	"strings"
)

// jsonErrors makes every error answer of the API JSON (api.Error), also
// those that the mux (no such route, wrong method) and the file server
// write as plain text, so that a client parses one form on every route.
// The console's HTML pages pass as they are.
func jsonErrors(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		jw := &jsonErrorWriter{ResponseWriter: w}
		h.ServeHTTP(jw, r)
		if jw.code == 0 {
			return
		}
		msg := strings.TrimSpace(jw.body.String())
		if jw.code == http.StatusNotFound && msg == "404 page not found" {
			msg = fmt.Sprintf("not found: %s %s", r.Method, r.URL.Path)
		}
		w.Header().Del("Content-Length")
		w.Header().Del("X-Content-Type-Options")
		fail(w, jw.code, msg)
	})
}

// jsonErrorWriter holds back a plain-text error answer for jsonErrors.
type jsonErrorWriter struct {
	http.ResponseWriter
	code int // the status of a plain-text error held back; 0 if none
	body bytes.Buffer
}

func (w *jsonErrorWriter) WriteHeader(code int) {
	ct := w.Header().Get("Content-Type")
	if code >= 400 && !strings.HasPrefix(ct, "application/json") && !strings.HasPrefix(ct, "text/html") { // the console's pages stay pages
		w.code = code
		return
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *jsonErrorWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		return w.ResponseWriter.Write(b)
	}
	if w.body.Len() < 1024 { // a message, not a page
		w.body.Write(b[:min(len(b), 1024-w.body.Len())])
	}
	return len(b), nil
}

// Unwrap lets http.ResponseController reach the connection (deadlines).
func (w *jsonErrorWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
