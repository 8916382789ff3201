package livepatch

import (
	"strings"
	"testing"
)

// The stall of net_core_pktgen before its livepatch form: two kpktgend
// threads in their main function. A kworker waiting in a work item gets
// no hint: its main function is worker_thread.
func TestKthreadHint(t *testing.T) {
	pktgen := []string{"pktgen_thread_worker+0x19b7/0x19d0 [pktgen]", "kthread+0xda/0x100", "ret_from_fork+0x22/0x30"}
	e := &TransitionError{Patch: "stitch_net_core_pktgen", Enabling: true, Holders: []Task{
		{PID: 99, Comm: "kpktgend_0", Stack: pktgen}, {PID: 100, Comm: "kpktgend_1", Stack: pktgen},
	}}
	msg := e.Error()
	if !strings.Contains(msg, "kernel thread(s) kpktgend_0, kpktgend_1 run their main function (pktgen_thread_worker)") || !strings.Contains(msg, "Kernel threads that never leave a patched function") {
		t.Errorf("no hint about the kernel threads:\n%s", msg)
	}
	kworker := &TransitionError{Patch: "p", Enabling: true, Holders: []Task{
		{PID: 7, Comm: "kworker/0:1", Stack: []string{"msleep+0x2d/0x40", "some_work_fn+0x10/0x20", "process_one_work+0x1c4/0x380", "worker_thread+0x4d/0x380", "kthread+0xda/0x100", "ret_from_fork+0x22/0x30"}},
		{PID: 1, Comm: "init", Stack: []string{"do_wait+0x1/0x2"}},
	}}
	if msg := kworker.Error(); strings.Contains(msg, "kernel thread(s)") {
		t.Errorf("a hint for a kworker or a user task:\n%s", msg)
	}
}
