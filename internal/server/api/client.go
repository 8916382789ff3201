package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Sentinels a StatusError wraps, by HTTP status: 401, 403, 429, and any
// other 4xx. A 5xx wraps none of them (the server failed, try again
// later); nor does 429 wrap ErrBadRequest: the request was fine, only too
// soon.
var (
	ErrUnauthorized = errors.New("unauthorized")
	ErrForbidden    = errors.New("forbidden")
	ErrBadRequest   = errors.New("bad request")
	ErrRateLimited  = errors.New("rate limited")
)

// StatusError is a non-2xx answer; Message is the server's error text.
type StatusError struct {
	Code    int
	Message string
	// RetryAfter is the server's Retry-After (429, 503), zero when none.
	RetryAfter time.Duration
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("server answered %d %s: %s", e.Code, http.StatusText(e.Code), e.Message)
}

func (e *StatusError) Unwrap() error {
	switch {
	case e.Code == http.StatusUnauthorized:
		return ErrUnauthorized
	case e.Code == http.StatusForbidden:
		return ErrForbidden
	case e.Code == http.StatusTooManyRequests:
		return ErrRateLimited
	case e.Code >= 400 && e.Code < 500:
		return ErrBadRequest
	}
	return nil
}

// MaxResponse bounds what the client reads of any answer.
const MaxResponse = 4 << 20

// Client calls the server's API. Token is the machine's bearer token (or
// the admin token, for Do on admin paths).
type Client struct {
	BaseURL string // e.g. "http://127.0.0.1:8440"
	Token   string
	HTTP    *http.Client // http.DefaultClient when nil
}

// Enroll registers the machine with an enrollment key. It needs no token;
// keep the answer's token for the other calls.
func (c *Client) Enroll(ctx context.Context, req EnrollRequest) (EnrollResponse, error) {
	var out EnrollResponse
	err := c.Do(ctx, http.MethodPost, PathEnroll, req, &out)
	return out, err
}

// CheckIn reports the machine's kernel and patches and returns its orders.
func (c *Client) CheckIn(ctx context.Context, in CheckIn) (CheckInResponse, error) {
	var out CheckInResponse
	err := c.Do(ctx, http.MethodPost, PathCheckIn, in, &out)
	return out, err
}

// Health reports one health check of one patch.
func (c *Client) Health(ctx context.Context, h Health) error {
	return c.Do(ctx, http.MethodPost, PathHealth, h, nil)
}

// Self reads the machine's own record.
func (c *Client) Self(ctx context.Context) (MachineView, error) {
	var out MachineView
	err := c.Do(ctx, http.MethodGet, PathSelf, nil, &out)
	return out, err
}

// Do sends in (JSON; nothing when nil) to path and decodes a 2xx answer
// into out (ignored when nil). Other answers return *StatusError.
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("%s %s: encode: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(c.BaseURL, "/")+path, body)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, MaxResponse+1))
	if err != nil {
		return fmt.Errorf("%s %s: read answer: %w", method, path, err)
	}
	if len(data) > MaxResponse {
		return fmt.Errorf("%s %s: answer over %d bytes", method, path, MaxResponse)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		var e Error
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(data[:min(len(data), 512)]))
		}
		se := &StatusError{Code: resp.StatusCode, Message: e.Error}
		if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && secs > 0 {
			se.RetryAfter = time.Duration(min(secs, 86400)) * time.Second
		}
		return fmt.Errorf("%s %s: %w", method, path, se)
	}
	if out == nil || resp.StatusCode == http.StatusNoContent {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
	}
	return nil
}
