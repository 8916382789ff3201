package agent

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// Units are the systemd units that run the agent: one early at boot that
// reloads the cached patches before the network is up (and not at all
// with stitch=off), and the daemon.
func Units(bin, dir string) map[string]string {
	return map[string]string{
		"stitch-agent-boot.service": `[Unit]
Description=Stitch: reload live patches from the local cache
Documentation=https://github.com/stitchpatch/stitch/blob/main/docs/agent.md
DefaultDependencies=no
After=local-fs.target systemd-modules-load.service
Before=sysinit.target network-pre.target
ConditionKernelCommandLine=!stitch=off
ConditionPathExists=` + dir + `/config.json

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=` + bin + ` agent --boot --dir ` + dir + `

[Install]
WantedBy=sysinit.target
`,
		"stitch-agent.service": `[Unit]
Description=Stitch live patching agent
Documentation=https://github.com/stitchpatch/stitch/blob/main/docs/agent.md
Wants=network-online.target
After=network-online.target stitch-agent-boot.service
ConditionPathExists=` + dir + `/config.json

[Service]
ExecStart=` + bin + ` agent --dir ` + dir + `
Restart=on-failure
RestartSec=60
# Few resources: the agent sleeps between check-ins.
MemoryMax=64M
Nice=10

[Install]
WantedBy=multi-user.target
`,
	}
}

// Install copies the binary self to bin and writes the units into
// unitDir (/etc/systemd/system). It does not start anything; the caller
// tells systemd.
func Install(self, bin, unitDir, dir string, log io.Writer) error {
	if !filepath.IsAbs(bin) || !filepath.IsAbs(dir) {
		return fmt.Errorf("install: %s and %s must be absolute paths", bin, dir)
	}
	if err := os.MkdirAll(unitDir, 0o755); err != nil {
		return fmt.Errorf("install: %w", err)
	}
	if self != bin {
		data, err := os.ReadFile(self)
		if err != nil {
			return fmt.Errorf("install: read this binary: %w", err)
		}
		if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
			return fmt.Errorf("install: %w", err)
		}
		if err := writeFile(bin, data, 0o755); err != nil {
			return fmt.Errorf("install %s: %w", bin, err)
		}
		fmt.Fprintf(log, "installed %s\n", bin)
	}
	for name, text := range Units(bin, dir) {
		path := filepath.Join(unitDir, name)
		if err := writeFile(path, []byte(text), 0o644); err != nil {
			return fmt.Errorf("install %s: %w", path, err)
		}
		fmt.Fprintf(log, "wrote %s\n", path)
	}
	return nil
}

// UnitNames lists the units in the order to enable them.
func UnitNames() []string {
	return []string{"stitch-agent-boot.service", "stitch-agent.service"}
}

// bootDisabled says whether the kernel command line turns Stitch off.
func bootDisabled(cmdline string) bool {
	for _, f := range strings.Fields(cmdline) {
		if f == "stitch=off" {
			return true
		}
	}
	return false
}
