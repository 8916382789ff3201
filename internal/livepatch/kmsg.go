package livepatch

import (
	"errors"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// KernelLog reads the kernel log records written after it was opened, so
// an error can quote what the kernel said about it. A nil *KernelLog (no
// /dev/kmsg) reads nothing.
type KernelLog struct{ f *os.File }

// OpenKernelLog starts reading /dev/kmsg at its end.
func OpenKernelLog() *KernelLog {
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	if _, err := unix.Seek(fd, 0, 2 /* SEEK_END */); err != nil {
		unix.Close(fd)
		return nil
	}
	return &KernelLog{f: os.NewFile(uintptr(fd), "/dev/kmsg")}
}

// ReadNew returns the messages logged since the last read, one a line.
func (k *KernelLog) ReadNew() string {
	if k == nil {
		return ""
	}
	var b strings.Builder
	buf := make([]byte, 8192)
	for {
		// Each read returns one record: "prio,seq,usec,flags;text\n".
		n, err := unix.Read(int(k.f.Fd()), buf)
		if errors.Is(err, unix.EPIPE) {
			continue // records were overwritten; go on with the next
		}
		if err != nil || n <= 0 {
			return b.String()
		}
		rec := string(buf[:n])
		if _, text, ok := strings.Cut(rec, ";"); ok {
			text, _, _ = strings.Cut(text, "\n") // continuation lines hold key=value pairs
			b.WriteString(text + "\n")
		}
	}
}

// Close stops reading.
func (k *KernelLog) Close() {
	if k != nil {
		k.f.Close()
	}
}

// troubleMarkers start the kernel log lines of warnings, oopses and
// lockups.
var troubleMarkers = []string{"WARNING:", "BUG:", "Oops", "general protection fault", "invalid opcode", "soft lockup", "Kernel panic"}

// TroubleLines picks from kernel log text the lines that tell of a
// warning, an oops or a lockup.
func TroubleLines(log string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		for _, m := range troubleMarkers {
			if strings.Contains(l, m) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}
