package bundle

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/stitchpatch/stitch/internal/contract"
)

// Tree is what a build's output directory holds to publish: for each
// kernel a patch was built for, OUT/RELEASE/NAME.ko with its manifest
// OUT/RELEASE/NAME.json, and for each kernel that already contains the
// fix, OUT/RELEASE/NAME.contained.json. A one-kernel build's output
// (OUT/NAME.ko and OUT/NAME.json) is a tree too.
type Tree struct {
	Bundles   [][]byte              // packed from each module and its manifest
	Contained []*contract.Contained // the contained records
	// Files are the files each bundle, then each record, came from (the
	// manifest's path for a bundle), relative to the tree.
	Files []string
	// Skipped are the files in the tree that are neither (build logs,
	// reports), relative to it.
	Skipped []string
}

// ReadTree reads and checks a build's output tree: every module is packed
// with its manifest (so a module without its manifest, a manifest without
// its module, or a pair that disagrees is refused, as `stitch publish
// --module --manifest` refuses it), every contained record is parsed, and
// each file must sit in its kernel's directory. Nothing is written; the
// first problem is the error, naming the file.
func ReadTree(dir string) (*Tree, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("read tree: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("read tree %s: %w: not a directory", dir, ErrBadBundle)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read tree %s: %w", dir, err)
	}
	t := &Tree{}
	var recFiles []string
	// "" is the tree's top: a one-kernel build's output, any release.
	levels := []string{""}
	for _, e := range entries {
		if e.IsDir() && contract.ValidRelease(e.Name()) {
			levels = append(levels, e.Name())
		}
	}
	seen := map[string]string{} // release/name → the file that gave it
	claim := func(release, name, file string) error {
		key := release + "/" + name
		if prev, ok := seen[key]; ok {
			return fmt.Errorf("read tree %s: %w: %s and %s are both for %s on %s: a kernel has a patch or contains the fix, not both; remove the stale one", dir, ErrBadBundle, prev, file, name, release)
		}
		seen[key] = file
		return nil
	}
	for _, rel := range levels {
		files, err := os.ReadDir(filepath.Join(dir, rel))
		if err != nil {
			return nil, fmt.Errorf("read tree %s: %w", dir, err)
		}
		names := map[string]bool{}
		for _, f := range files {
			if f.Type().IsRegular() {
				names[f.Name()] = true
			}
		}
		for _, f := range files {
			name, path := f.Name(), filepath.Join(rel, f.Name())
			switch {
			case f.IsDir() && rel == "" && contract.ValidRelease(name):
				continue // a kernel's directory, read as a level of its own
			case !f.Type().IsRegular():
				t.Skipped = append(t.Skipped, path)
			case strings.HasSuffix(name, contract.ContainedSuffix):
				c, err := contract.ReadContained(filepath.Join(dir, path))
				if err != nil {
					return nil, fmt.Errorf("read tree %s: %s: %w", dir, path, err)
				}
				if rel != "" && c.Kernel.Release != rel {
					return nil, fmt.Errorf("read tree %s: %s: %w: the record is for kernel %s, not %s, whose directory it is in", dir, path, contract.ErrBadContained, c.Kernel.Release, rel)
				}
				if err := claim(c.Kernel.Release, c.Name, path); err != nil {
					return nil, err
				}
				t.Contained = append(t.Contained, c)
				recFiles = append(recFiles, path)
			case strings.HasSuffix(name, ".ko"):
				manifest := strings.TrimSuffix(path, ".ko") + ".json"
				if !names[filepath.Base(manifest)] {
					return nil, fmt.Errorf("read tree %s: %s: %w: no manifest %s next to it (stitch build writes both)", dir, path, ErrBadBundle, manifest)
				}
				data, m, err := packFiles(filepath.Join(dir, path), filepath.Join(dir, manifest))
				if err != nil {
					return nil, fmt.Errorf("read tree %s: %s: %w", dir, manifest, err)
				}
				if rel != "" && m.Kernel.Release != rel {
					return nil, fmt.Errorf("read tree %s: %s: %w: the manifest is for kernel %s, not %s, whose directory it is in", dir, manifest, contract.ErrBadManifest, m.Kernel.Release, rel)
				}
				if m.Module != name {
					return nil, fmt.Errorf("read tree %s: %s: %w: the manifest names module %s, not %s", dir, manifest, contract.ErrBadManifest, m.Module, name)
				}
				if err := claim(m.Kernel.Release, m.Name, manifest); err != nil {
					return nil, err
				}
				t.Bundles = append(t.Bundles, data)
				t.Files = append(t.Files, manifest)
			case strings.HasSuffix(name, ".json") && names[strings.TrimSuffix(name, ".json")+".ko"]:
				// A module's manifest: packed with it above.
			case strings.HasSuffix(name, ".json") && isManifest(filepath.Join(dir, path)):
				return nil, fmt.Errorf("read tree %s: %s: %w: a manifest without its module %s", dir, path, ErrBadBundle, strings.TrimSuffix(path, ".json")+".ko")
			default:
				t.Skipped = append(t.Skipped, path)
			}
		}
	}
	t.Files = append(t.Files, recFiles...)
	if len(t.Files) == 0 {
		return nil, fmt.Errorf("read tree %s: %w: no module (RELEASE/NAME.ko with NAME.json) and no contained record (RELEASE/NAME%s) in it", dir, ErrBadBundle, contract.ContainedSuffix)
	}
	slices.Sort(t.Skipped)
	return t, nil
}

// packFiles bundles a module file with its manifest file.
func packFiles(module, manifest string) ([]byte, *contract.Manifest, error) {
	m, err := contract.ReadManifest(manifest)
	if err != nil {
		return nil, nil, err
	}
	fi, err := os.Stat(module)
	if err != nil {
		return nil, nil, err
	}
	if fi.Size() > MaxModuleSize {
		return nil, nil, fmt.Errorf("%w: %s is %d bytes, at most %d", ErrBadBundle, module, fi.Size(), MaxModuleSize)
	}
	ko, err := os.ReadFile(module)
	if err != nil {
		return nil, nil, err
	}
	data, err := Pack(*m, ko)
	if err != nil {
		return nil, nil, err
	}
	return data, m, nil
}

// isManifest says whether the file at path is a valid manifest: a JSON
// file of a build's output that is not one is some other report, and
// skipped.
func isManifest(path string) bool {
	_, err := contract.ReadManifest(path)
	return err == nil
}
