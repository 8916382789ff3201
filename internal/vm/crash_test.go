package vm

import (
	"strings"
	"testing"
)

func TestCrashSummary(t *testing.T) {
	console := `[   20.100000] stitch: guest started
[   24.460900] BUG: unable to handle page fault for address: ffffffffc0a01040
[   24.460910] #PF: supervisor instruction fetch in kernel mode
[   24.460920] Oops: 0010 [#1] PREEMPT SMP NOPTI
[   24.460930] CPU: 1 PID: 0 Comm: swapper/1 Tainted: G           OE K    6.12.117+deb12-amd64 #1
[   24.460940] RIP: 0010:0xffffffffc0a01040
[   24.460950] Code: Unable to access opcode bytes at 0xffffffffc0a01016.
[   24.460960] RAX: 0000000000000000 RBX: 0000000000000000 RCX: ffff89ba412d1840
[   24.460970] Call Trace:
[   24.460971]  <IRQ>
[   24.460972]  ? __die+0x23/0x70
[   24.460973]  rcu_do_batch+0x1a2/0x4a0
[   24.460974]  rcu_core+0x1b9/0x4e0
[   24.460975]  handle_softirqs+0xd2/0x2b0
[   24.460976]  irq_exit_rcu+0x8b/0xb0
[   24.460977]  sysvec_apic_timer_interrupt+0x71/0x90
[   24.460978]  </IRQ>
[   24.460979]  <TASK>
[   24.460980]  asm_sysvec_apic_timer_interrupt+0x1a/0x20
[   24.460981]  pv_native_safe_halt+0xf/0x20
[   24.460982]  default_idle+0x9/0x20
[   24.460983] Modules linked in: lp_cmdline(OEK)
[   24.461000] RIP: 0010:0xffffffffc0a01040
[   24.461010] RAX: 0000000000000000 RBX: 0000000000000000 RCX: ffff89ba412d1840
[   24.461151] Kernel panic - not syncing: Fatal exception in interrupt
[   26.897704] Shutting down cpus with NMI
`
	got := crashSummary(console)
	for _, want := range []string{
		"BUG: unable to handle page fault for address: ffffffffc0a01040",
		"Oops: 0010 [#1]",
		"RIP: 0010:0xffffffffc0a01040",
		"rcu_do_batch+0x1a2/0x4a0",
		"Kernel panic - not syncing: Fatal exception in interrupt",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("summary lacks %q:\n%s", want, got)
		}
	}
	for _, unwanted := range []string{"guest started", "RAX:", "Code:", "Modules linked in", "default_idle"} {
		if strings.Contains(got, unwanted) {
			t.Errorf("summary holds %q:\n%s", unwanted, got)
		}
	}
	if s := crashSummary("[    1.0] booted\n[    2.0] done\n"); s != "" {
		t.Errorf("summary of a console without a crash = %q, want empty", s)
	}
}
