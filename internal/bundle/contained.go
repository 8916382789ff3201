package bundle

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/stitchpatch/stitch/internal/contract"
	"github.com/stitchpatch/stitch/internal/modsign"
	"github.com/theupdateframework/go-tuf/v2/metadata"
)

// A contained record (contract.Contained: a kernel whose source already
// contains a fix) is published as a signed target of its own, next to the
// bundles: contained/RELEASE/NAME-HASH16.json, its bytes the record's
// canonical JSON. The targets role signs its length and hash as it signs
// a bundle's, so a server or an agent trusts the record exactly as much
// as a patch, mirrors carry it with the rest, and a record once published
// is never rewritten (a newer check is a new target).

// Kinds of published targets.
const (
	KindPatch     = "patch"
	KindContained = "contained"
)

// Published is one target PublishAll stored (or found already there).
type Published struct {
	Target  string `json:"target"`
	Kind    string `json:"kind"` // KindPatch or KindContained
	Name    string `json:"name"`
	Release string `json:"release"`
	SHA256  string `json:"sha256"`
	// New is false when the same bytes were published before.
	New bool `json:"new"`
	// Signer is the key id of the module-signing key that signed a
	// bundle's module; empty when the repository signs no modules.
	Signer string `json:"signer,omitempty"`
}

// EncodeContained checks a contained record and gives its canonical
// bytes, the content a repository stores and signs: the same record
// always gives the same bytes, hence the same target name.
func EncodeContained(c *contract.Contained) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode contained record: %w", err)
	}
	return append(b, '\n'), nil
}

// ContainedTargetName is a contained record's name in a repository, for
// its canonical bytes data (contract.ContainedTargetName).
func ContainedTargetName(c *contract.Contained, data []byte) string {
	return contract.ContainedTargetName(c, SHA256Hex(data))
}

// PublishAll publishes bundles and contained records together: every one
// is checked before anything is written, so one bad input leaves the
// repository as it was, and all of them go out in one new set of
// metadata (one targets version), so an agent or a server sees all or
// none. Targets already published (the same bytes) are kept as they are.
// The result lists the bundles first, then the records, in their order.
//
// When the repository has a module-signing key (InitSigning), every
// bundle's module is signed with the current key first (an old signature
// replaced), and the bundle published is the signed one: its manifest's
// module_sha256, its hash and its target name are the signed module's.
func (r *Repo) PublishAll(bundles [][]byte, contained []*contract.Contained) ([]Published, error) {
	type item struct {
		Published
		data []byte
	}
	var items []item
	var key crypto.Signer
	var cert *x509.Certificate
	if len(bundles) > 0 {
		var err error
		if key, cert, err = r.moduleSigner(); err != nil {
			return nil, fmt.Errorf("publish: %w", err)
		}
	}
	for _, data := range bundles {
		b, err := Open(data)
		if err != nil {
			return nil, fmt.Errorf("publish: %w", err)
		}
		signer := ""
		if key != nil {
			if data, err = signBundle(b, key, cert); err != nil {
				return nil, fmt.Errorf("publish %s: %w", b.Manifest.Name, err)
			}
			name := b.Manifest.Name
			if b, err = Open(data); err != nil {
				return nil, fmt.Errorf("publish %s: signed: %w", name, err)
			}
			signer = modsign.KeyID(cert)
		}
		m := &b.Manifest
		items = append(items, item{Published{Target: TargetName(m, data), Kind: KindPatch, Name: m.Name, Release: m.Kernel.Release, SHA256: SHA256Hex(data), Signer: signer}, data})
	}
	for _, c := range contained {
		data, err := EncodeContained(c)
		if err != nil {
			return nil, fmt.Errorf("publish: %w", err)
		}
		items = append(items, item{Published{Target: ContainedTargetName(c, data), Kind: KindContained, Name: c.Name, Release: c.Kernel.Release, SHA256: SHA256Hex(data)}, data})
	}
	if len(items) == 0 {
		return nil, fmt.Errorf("publish: %w: nothing to publish", ErrBadBundle)
	}
	unlock, err := r.lock()
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	defer unlock()
	st, err := r.prepare()
	if err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	out := make([]Published, len(items))
	changed := false
	for i, it := range items {
		out[i] = it.Published
		if _, ok := st.targets.Signed.Targets[it.Target]; ok {
			continue
		}
		tf, err := metadata.TargetFile().FromBytes(it.Target, it.data, "sha256")
		if err != nil {
			return nil, fmt.Errorf("publish %s: %w", it.Target, err)
		}
		// The files go first: metadata that names a target whose file is
		// not there yet is what a crash must never leave.
		if err := r.writeTarget(it.Target, it.data); err != nil {
			return nil, fmt.Errorf("publish %s: %w", it.Target, err)
		}
		st.targets.Signed.Targets[it.Target] = tf
		out[i].New, changed = true, true
	}
	if !changed {
		return out, nil
	}
	if err := r.cascade(st, metadata.TARGETS); err != nil {
		return nil, fmt.Errorf("publish: %w", err)
	}
	return out, nil
}

// ContainedTargets lists the published contained records' target names,
// sorted.
func (r *Repo) ContainedTargets() ([]string, error) {
	names, err := r.Targets()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, n := range names {
		if strings.HasPrefix(n, contract.ContainedDir+"/") {
			out = append(out, n)
		}
	}
	return out, nil
}

// OpenContained reads a published contained record, checks it against
// the signed targets metadata (length and hash) and parses it: what a
// server reads to learn which kernels contain a fix.
func (r *Repo) OpenContained(name string) (*contract.Contained, error) {
	if !contract.ValidContainedTarget(name) {
		return nil, fmt.Errorf("target %s: %w: not a contained record's name (contained/RELEASE/NAME-HASH.json)", name, ErrNotFound)
	}
	data, err := r.readTarget(name)
	if err != nil {
		return nil, err
	}
	return openContained(name, data)
}

// openContained parses a contained record's bytes and holds it to its
// name: a record signed under another kernel's or patch's name is refused.
func openContained(name string, data []byte) (*contract.Contained, error) {
	c, err := contract.ParseContained(data)
	if err != nil {
		return nil, fmt.Errorf("target %s: %w", name, err)
	}
	if want := ContainedTargetName(c, data); want != name {
		return nil, fmt.Errorf("target %s: %w: the record is for %s %s, whose name would be %s", name, ErrBadBundle, c.Kernel.Release, c.Name, want)
	}
	return c, nil
}
