package bundle

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/theupdateframework/go-tuf/v2/metadata"
	"github.com/theupdateframework/go-tuf/v2/metadata/config"
	"github.com/theupdateframework/go-tuf/v2/metadata/fetcher"
	"github.com/theupdateframework/go-tuf/v2/metadata/updater"
)

// Client fetches bundles through TUF: every fetch refreshes the metadata
// from the trusted root on, checks signatures, thresholds, versions
// (no rollback), expiry (no frozen metadata) and the bundle's length and
// hash, and only then opens the bundle.
type Client struct {
	// BaseURL serves metadata at BaseURL/metadata/ and bundles at
	// BaseURL/targets/ (what `stitch server` does under /v1/repo).
	BaseURL string
	// TrustedRoot is the root.json pinned at enrollment; used only until
	// CacheDir holds a newer verified root.
	TrustedRoot []byte
	// CacheDir keeps verified metadata (so rollback is caught across runs)
	// and downloaded bundles.
	CacheDir string
	HTTP     *http.Client     // http.DefaultClient when nil
	Now      func() time.Time // reference time for expiry; time.Now when nil
}

// Fetch downloads the target, verifies it and returns the bundle and the
// path of its cached copy.
func (c *Client) Fetch(ctx context.Context, target string) (*Bundle, string, error) {
	data, path, err := c.download(ctx, target)
	if err != nil {
		return nil, "", err
	}
	b, err := Open(data)
	if err != nil {
		os.Remove(path)
		return nil, "", fmt.Errorf("fetch %s: %w", target, err)
	}
	return b, path, nil
}

// download gives the target's verified bytes and the path of its cached
// copy, fetching it unless the cache holds it already.
func (c *Client) download(ctx context.Context, target string) ([]byte, string, error) {
	up, err := c.updater(ctx)
	if err != nil {
		return nil, "", fmt.Errorf("fetch %s: %w", target, err)
	}
	return c.downloadWith(up, target)
}

// downloadWith is download with metadata up has refreshed already.
func (c *Client) downloadWith(up *updater.Updater, target string) ([]byte, string, error) {
	info, err := up.GetTargetInfo(target)
	if err != nil {
		// Metadata is already verified by updater; what fails here is the
		// look-up of the name.
		return nil, "", fmt.Errorf("fetch %s: %w: not in the signed targets", target, ErrNotFound)
	}
	path := filepath.Join(c.CacheDir, "targets", SHA256Hex([]byte(target))[:32]+".stitch")
	if _, data, err := up.FindCachedTarget(info, path); err == nil && data != nil {
		return data, path, nil
	}
	_, data, err := up.DownloadTarget(info, path, "")
	if err != nil {
		os.Remove(path)
		return nil, "", fmt.Errorf("fetch %s: %w", target, classify(err))
	}
	return data, path, nil
}

// Targets refreshes the metadata and lists the verified target names.
func (c *Client) Targets(ctx context.Context) ([]string, error) {
	up, err := c.updater(ctx)
	if err != nil {
		return nil, err
	}
	var names []string
	for n := range up.GetTopLevelTargets() {
		names = append(names, n)
	}
	return names, nil
}

func (c *Client) updater(ctx context.Context) (*updater.Updater, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	metaDir := filepath.Join(c.CacheDir, "metadata")
	for _, d := range []string{metaDir, filepath.Join(c.CacheDir, "targets")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	root := c.TrustedRoot
	if b, err := os.ReadFile(filepath.Join(metaDir, "root.json")); err == nil {
		root = b
	}
	cfg, err := config.New(c.BaseURL+"/metadata", root)
	if err != nil {
		return nil, err
	}
	cfg.RemoteTargetsURL = c.BaseURL + "/targets"
	cfg.LocalMetadataDir = metaDir
	cfg.LocalTargetsDir = filepath.Join(c.CacheDir, "targets")
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	f := fetcher.NewDefaultFetcher()
	f.SetHTTPClient(&ctxClient{ctx: ctx, hc: hc})
	f.SetRetry(0, 1)
	cfg.Fetcher = f
	up, err := updater.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("%w: trusted root: %v", ErrVerify, err)
	}
	if c.Now != nil {
		up.UnsafeSetRefTime(c.Now())
	}
	if err := up.Refresh(); err != nil {
		return nil, classify(err)
	}
	return up, nil
}

// ctxClient makes go-tuf's fetches obey the caller's context.
type ctxClient struct {
	ctx context.Context
	hc  *http.Client
}

func (c *ctxClient) Do(req *http.Request) (*http.Response, error) {
	return c.hc.Do(req.WithContext(c.ctx))
}

// classify wraps go-tuf's refusals in ErrVerify with a plain reason, and
// a missing target in ErrNotFound.
func classify(err error) error {
	var (
		expired  *metadata.ErrExpiredMetadata
		version  *metadata.ErrBadVersionNumber
		unsigned *metadata.ErrUnsignedMetadata
		hash     *metadata.ErrLengthOrHashMismatch
		repo     *metadata.ErrRepository
		dl       *metadata.ErrDownloadHTTP
		dlen     *metadata.ErrDownloadLengthMismatch
	)
	switch {
	case errors.As(err, &expired):
		return fmt.Errorf("%w: expired metadata (the repository was not refreshed, a mirror was not updated from a newer export, or an attacker is replaying old metadata): %v", ErrVerify, err)
	case errors.As(err, &version):
		return fmt.Errorf("%w: rollback to an older metadata version: %v", ErrVerify, err)
	case errors.As(err, &unsigned):
		return fmt.Errorf("%w: bad or missing signature (tampered metadata or a key not in the trusted root): %v", ErrVerify, err)
	case errors.As(err, &hash), errors.As(err, &dlen):
		return fmt.Errorf("%w: content does not match its signed length and hash (tampered): %v", ErrVerify, err)
	case errors.As(err, &dl) && dl.StatusCode == http.StatusNotFound:
		return fmt.Errorf("%w: %v", ErrNotFound, err)
	case errors.As(err, &repo):
		return fmt.Errorf("%w: %v", ErrVerify, err)
	}
	return err
}
