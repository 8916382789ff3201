package livepatch

import (
	"errors"
	"reflect"
	"testing"
)

// testdata/capture is a copy of the readable livepatch files of a real
// 6.1.0-54 kernel with one patch applied and another stalled.
func captured() *Kernel { return &Kernel{Root: "testdata/capture"} }

func TestStatusFromCapture(t *testing.T) {
	st, err := captured().Status()
	if err != nil {
		t.Fatal(err)
	}
	if !st.Livepatch {
		t.Fatal("livepatch support not detected")
	}
	want := []Patch{
		{Name: "lp_cmdline", Enabled: true, Objects: []Object{
			{Name: "vmlinux", Patched: true, Functions: []Function{{Name: "cmdline_proc_show", Sympos: 1}}},
		}},
		{Name: "lp_stall", Enabled: true, Transition: true, Objects: []Object{
			{Name: "stall_helper", Patched: true, Functions: []Function{{Name: "stall_helper_wait", Sympos: 1}}},
		}},
	}
	if !reflect.DeepEqual(st.Patches, want) {
		t.Errorf("patches:\n got %+v\nwant %+v", st.Patches, want)
	}
	// The .notes of the 6.1.0-54-amd64 image, as readelf -n shows them.
	if st.BuildID != "887cd47f03581c5baf735611814b0308637cd7f2" {
		t.Errorf("build-id = %q", st.BuildID)
	}
	if got := st.Taint.String(); got != "OEK" || st.Taint.Value != 45056 {
		t.Errorf("taint = %d %q, want 45056 OEK", st.Taint.Value, got)
	}
}

func TestInTransitionFromCapture(t *testing.T) {
	name, err := captured().inTransition()
	if err != nil || name != "lp_stall" {
		t.Fatalf("inTransition = %q, %v; want lp_stall", name, err)
	}
}

func TestHoldersFromCapture(t *testing.T) {
	k := captured()
	hs := k.holders(1, true)
	if len(hs) != 1 {
		t.Fatalf("holders = %+v, want the stitch-stall thread", hs)
	}
	h := hs[0]
	wantStack := []string{
		"msleep_interruptible+0x32/0x60",
		"stall_helper_wait+0x11/0x30 [stall_helper]",
		"kthread+0xda/0x100",
		"ret_from_fork+0x22/0x30",
	}
	if h.PID != 95 || h.TGID != 95 || h.Comm != "stitch-stall" || !reflect.DeepEqual(h.Stack, wantStack) {
		t.Errorf("holder = %+v", h)
	}
	// Unpatching, the same task (patch_state 0) is already where it must be.
	if hs := k.holders(0, false); len(hs) != 0 {
		t.Errorf("holders of an unpatching transition = %+v, want none", hs)
	}
}

func TestUnknownPatch(t *testing.T) {
	if _, err := captured().Patch("nope"); !errors.Is(err, ErrUnknownPatch) {
		t.Errorf("Patch(nope) = %v, want ErrUnknownPatch", err)
	}
}

func TestNoLivepatchSupport(t *testing.T) {
	k := &Kernel{Root: t.TempDir()}
	if err := k.Supported(); !errors.Is(err, ErrUnsupported) {
		t.Errorf("Supported() on a kernel without /sys/kernel/livepatch = %v", err)
	}
}

func TestDecodeTaint(t *testing.T) {
	tests := []struct {
		v    uint64
		want string
	}{
		{0, ""},
		{1 << 9, "W"},
		{1<<7 | 1<<15, "DK"},
		{1 << 40, "?"},
	}
	for _, tt := range tests {
		if got := DecodeTaint(tt.v).String(); got != tt.want {
			t.Errorf("DecodeTaint(%d) = %q, want %q", tt.v, got, tt.want)
		}
	}
	if f := DecodeTaint(1 << 13).Flags[0]; !f.Relevant || f.Means != "unsigned module loaded" {
		t.Errorf("E flag = %+v", f)
	}
}
