package contract

// Contained records that a kernel's own source already contains fixes (they
// reverse-apply to it), so the kernel needs no patch for them. stitch build
// writes it as OUT/RELEASE/NAME.contained.json in place of a module and
// manifest; publish carries it to the server, and the fleet counts that
// kernel's machines as fixed for its CVEs.
type Contained struct {
	Version int      `json:"version"` // ManifestVersion
	Name    string   `json:"name"`    // the patch name a build would have given
	Kernel  KernelID `json:"kernel"`
	CVEs    []string `json:"cves,omitempty"`
	Fixes   []Fix    `json:"fixes"`
	Checked string   `json:"checked"` // RFC 3339
}
