package corpus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

func cands(names ...string) []Candidate {
	var out []Candidate
	for _, n := range names {
		f := strings.ReplaceAll(n, "_", "/") + ".c"
		out = append(out, Candidate{Name: n, Files: []string{f, strings.TrimSuffix(f, ".c") + ".o"}})
	}
	return out
}

// fakeBuild fails a set that holds a fix in bad (with the error bad
// gives) or every fix of a pair in clash (an error naming neither).
type fakeBuild struct {
	bad   map[string]func() error
	clash [][2]string
	calls [][]string
}

func (f *fakeBuild) try(_ context.Context, names []string) error {
	f.calls = append(f.calls, names)
	for _, n := range names {
		if mk, ok := f.bad[n]; ok {
			return mk()
		}
	}
	for _, c := range f.clash {
		if slices.Contains(names, c[0]) && slices.Contains(names, c[1]) {
			return errors.New("ld: module: section mismatch") // names no fix
		}
	}
	return nil
}

func TestCombineAllBuild(t *testing.T) {
	f := &fakeBuild{}
	res, err := Combine(context.Background(), cands("a_x", "b_y", "c_z"), f.try)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Kept, []string{"a_x", "b_y", "c_z"}) || len(res.Dropped) != 0 || res.Attempts != 1 {
		t.Fatalf("got %+v", res)
	}
}

func TestCombineDropsTheFixTheErrorNames(t *testing.T) {
	f := &fakeBuild{bad: map[string]func() error{
		"net_sctp_socket": func() error {
			return errors.New("run-pre matching failed: net/sctp/socket.c: sctp_sendmsg in sctp: code differs")
		},
		"fs_ext4_super": func() error { return &FixError{Fix: "fs_ext4_super", Err: errors.New("patch: hunk #2 FAILED")} },
	}}
	all := cands("block_blk-mq", "net_sctp_socket", "fs_ext4_super", "net_ipv4_socket")
	res, err := Combine(context.Background(), all, f.try)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Kept, []string{"block_blk-mq", "net_ipv4_socket"}) {
		t.Fatalf("kept %v", res.Kept)
	}
	if len(res.Dropped) != 2 || res.Dropped[0].Name != "net_sctp_socket" || res.Dropped[0].How != "named" ||
		!strings.Contains(res.Dropped[0].Reason, "code differs") || res.Dropped[1].Name != "fs_ext4_super" {
		t.Fatalf("dropped %+v", res.Dropped)
	}
	// Named fixes need no bisection: one build per drop, one that works.
	if res.Attempts != 3 {
		t.Errorf("%d attempts, want 3", res.Attempts)
	}
}

func TestCombineBisectsWhenTheErrorNamesNoFix(t *testing.T) {
	var names []string
	for i := range 40 {
		names = append(names, fmt.Sprintf("f%02d", i))
	}
	f := &fakeBuild{clash: [][2]string{{"f05", "f27"}}}
	res, err := Combine(context.Background(), cands(names...), f.try)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Dropped) != 1 || res.Dropped[0].Name != "f27" || res.Dropped[0].How != "bisect" ||
		!strings.Contains(res.Dropped[0].Reason, "the 27 fixes before it") || !strings.Contains(res.Dropped[0].Reason, "section mismatch") {
		t.Fatalf("dropped %+v", res.Dropped)
	}
	if len(res.Kept) != 39 || slices.Contains(res.Kept, "f27") {
		t.Fatalf("kept %v", res.Kept)
	}
	// A binary search: about log2(40) builds, not 40.
	if res.Attempts > 9 {
		t.Errorf("%d attempts", res.Attempts)
	}
	// The last build is the kept set's.
	if last := f.calls[len(f.calls)-1]; !slices.Equal(last, res.Kept) {
		t.Errorf("last build %v, kept %v", last, res.Kept)
	}
}

func TestCombineFixFailingAlone(t *testing.T) {
	// Every fix's error names every fix: bisection ends on the first.
	f := &fakeBuild{bad: map[string]func() error{"a": func() error { return errors.New("a b: both broken") }}}
	res, err := Combine(context.Background(), []Candidate{{Name: "a"}, {Name: "b"}}, f.try)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Kept, []string{"b"}) || len(res.Dropped) != 1 || res.Dropped[0].How != "alone" {
		t.Fatalf("%+v", res)
	}
}

func TestCombineNothingCombines(t *testing.T) {
	f := &fakeBuild{bad: map[string]func() error{
		"a": func() error { return errors.New("x") }, "b": func() error { return errors.New("y") },
	}}
	res, err := Combine(context.Background(), []Candidate{{Name: "a"}, {Name: "b"}}, f.try)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Kept) != 0 || len(res.Dropped) != 2 {
		t.Fatalf("%+v", res)
	}
}

func TestCombineStopsWithTheContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	try := func(ctx context.Context, names []string) error {
		cancel()
		return ctx.Err()
	}
	if _, err := Combine(ctx, cands("a", "b"), try); !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v", err)
	}
}

func TestBlame(t *testing.T) {
	set := cands("net_sctp_socket", "net_ipv4_tcp", "fs_proc_base")
	for _, c := range []struct {
		msg  string
		want []string
	}{
		{"net/sctp/socket.c: sctp_sendmsg: changed init code", []string{"net_sctp_socket"}},
		{"build module: net/ipv4/tcp.o: undefined reference", []string{"net_ipv4_tcp"}},
		{"patched drivers/net/sctp/socket.c: error", nil}, // another file's path ends the same
		{"fs/proc/base.c.", []string{"fs_proc_base"}},     // at the end of a sentence
		{"fs/proc/base.cc", nil},
		{"link: multiple definition of `foo'", nil},
	} {
		if got := Blame(errors.New(c.msg), set); !slices.Equal(got, c.want) {
			t.Errorf("Blame(%q) = %v, want %v", c.msg, got, c.want)
		}
	}
	wrapped := fmt.Errorf("level: %w", &FixError{Fix: "fs_proc_base", Err: errors.New("net/sctp/socket.c conflicts")})
	if got := Blame(wrapped, set); !slices.Equal(got, []string{"fs_proc_base"}) {
		t.Errorf("FixError: %v", got)
	}
	if Blame(nil, set) != nil {
		t.Error("nil error blames")
	}
}

func TestWithoutEvery(t *testing.T) {
	var names []string
	for i := 1; i <= 25; i++ {
		names = append(names, fmt.Sprint(i))
	}
	kept, left := WithoutEvery(names, 10)
	if !slices.Equal(left, []string{"10", "20"}) || len(kept) != 23 {
		t.Fatalf("kept %v left %v", kept, left)
	}
}

func TestAppliedIn(t *testing.T) {
	csv := "fix,file,changed_lines,location,object,functions,build_seconds,port,outcome,reason\n" +
		"a,a.c,1,vmlinux,vmlinux,f,1.0,clean,applied,\n" +
		"b,b.c,1,vmlinux,,,1.0,,refused,\"x, y\"\n" +
		"c,c.c,1,m,m,g,1.0,clean,applied,\n"
	got, err := AppliedIn(strings.NewReader(csv))
	if err != nil || !slices.Equal(got, []string{"a", "c"}) {
		t.Fatalf("%v %v", got, err)
	}
	if _, err := AppliedIn(strings.NewReader("x,y\n1,2\n")); err == nil || !strings.Contains(err.Error(), "no fix and outcome columns") {
		t.Fatalf("bad header: %v", err)
	}
	if _, err := AppliedIn(strings.NewReader("")); err == nil {
		t.Fatal("empty file accepted")
	}
}

func FuzzBlame(f *testing.F) {
	f.Add("net/sctp/socket.c: x", "net/sctp/socket.c")
	f.Add("a.c.", "a.c")
	f.Fuzz(func(t *testing.T, msg, file string) {
		got := Blame(errors.New(msg), []Candidate{{Name: "n", Files: []string{file}}})
		if len(got) == 1 && !strings.Contains(msg, file) && !strings.Contains(msg, "n") {
			t.Fatalf("blamed for %q in %q", file, msg)
		}
	})
}

func TestTimingSplit(t *testing.T) {
	s := time.Unix(100, 0)
	tm := &timing{start: s, stop: s.Add(10 * time.Second), patching: 3 * time.Second, unload: 8 * time.Second, pending: 4}
	total, load, tr, unload, pending := tm.split()
	if total != 10*time.Second || load != 3*time.Second || tr != 5*time.Second || unload != 2*time.Second || pending != 4 {
		t.Fatalf("split %v %v %v %v %d", total, load, tr, unload, pending)
	}
	// A transition over before the first poll: all load.
	tm = &timing{start: s, stop: s.Add(2 * time.Second)}
	if total, load, tr, unload, _ := tm.split(); total != load || tr != 0 || unload != 0 {
		t.Fatalf("quick: %v %v %v %v", total, load, tr, unload)
	}
}

func TestCombineGivesEachFixItsLines(t *testing.T) {
	// objdiff's refusals: a heading, then one line a problem, two fixes.
	f := &fakeBuild{bad: map[string]func() error{"kernel_trace_blktrace": func() error {
		return errors.New("fix cannot be live-patched:\n  kernel/trace/blktrace.c: blk_add_driver_data: no __fentry__ call\n  net/smc/af_smc.c: smc_init: init code changed")
	}}}
	set := append(cands("kernel_trace_blktrace", "fs_proc_base"), Candidate{Name: "net_smc_af_smc", Files: []string{"net/smc/af_smc.c"}})
	res, err := Combine(context.Background(), set, f.try)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Kept, []string{"fs_proc_base"}) || len(res.Dropped) != 2 || res.Dropped[0].Reason != "fix cannot be live-patched: kernel/trace/blktrace.c: blk_add_driver_data: no __fentry__ call" ||
		res.Dropped[1].Reason != "fix cannot be live-patched: net/smc/af_smc.c: smc_init: init code changed" {
		t.Fatalf("dropped %+v", res.Dropped)
	}
}
