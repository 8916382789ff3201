package contract

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"
)

// One CVE pattern: what FindCVEs takes from a fix's text, ValidCVE (the
// manifest's rule) accepts, and nothing else.
func TestCVEs(t *testing.T) {
	got := FindCVEs("Fixes CVE-2024-1234, CVE-2024-1234567 and CVE-2024-1234; not CVE-2024-12 nor CVE-2024-12345678 nor xCVE-2024-5678")
	if want := []string{"CVE-2024-1234", "CVE-2024-1234567"}; !reflect.DeepEqual(got, want) {
		t.Errorf("found %v, want %v", got, want)
	}
	for _, c := range got {
		if !ValidCVE(c) {
			t.Errorf("%s found but not valid", c)
		}
	}
	for _, bad := range []string{"CVE-2024-12", "CVE-2024-12345678", "cve-2024-1234", " CVE-2024-1234"} {
		if ValidCVE(bad) {
			t.Errorf("%q valid", bad)
		}
	}
}

func TestTargetNames(t *testing.T) {
	m := &Manifest{Name: "stitch_fix", Kernel: KernelID{Release: "6.1.0-54-amd64"}}
	name := TargetName(m, "0123456789abcdef0123456789abcdef")
	if name != "6.1.0-54-amd64/stitch_fix-0123456789abcdef.stitch" {
		t.Fatalf("target name %q", name)
	}
	if !ValidTarget(name) {
		t.Fatalf("TargetName made %q, which ValidTarget refuses", name)
	}
	for _, bad := range []string{"", "../x-0123456789abcdef.stitch", "6.1/x-0123456789ABCDEF.stitch", "6.1/x-0123.stitch", "6.1/a/x-0123456789abcdef.stitch"} {
		if ValidTarget(bad) {
			t.Errorf("%q accepted", bad)
		}
	}
}

// The schedule travels from server to agent; what the agent accepts
// must be a usable one.
func TestSchedule(t *testing.T) {
	if names := []string{DefaultSchedule[0].Name, DefaultSchedule[1].Name, DefaultSchedule[2].Name}; !reflect.DeepEqual(names, []string{"1m", "5m", "15m"}) {
		t.Errorf("default check names %v: agents in the field report these", names)
	}
	if n := NewSchedule(time.Hour+30*time.Minute, 2*time.Hour)[1].Name; n != "2h" {
		t.Errorf("2h named %q", n)
	}
	b, _ := json.Marshal(NewSchedule(40*time.Millisecond, time.Minute))
	var back Schedule
	if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(back, NewSchedule(40*time.Millisecond, time.Minute)) || back.Validate() != nil {
		t.Errorf("round trip of %s: %+v %v", b, back, err)
	}
	for name, s := range map[string]Schedule{
		"decreasing": {{"a", time.Minute}, {"b", time.Second}},
		"zero":       {{"a", 0}},
		"apply":      {{CheckApply, time.Minute}},
		"twice":      {{"a", time.Minute}, {"a", time.Hour}},
		"bad name":   {{"a b", time.Minute}},
	} {
		if s.Validate() == nil {
			t.Errorf("%s schedule accepted", name)
		}
	}
	if !DefaultSchedule.ValidCheck(CheckBoot) || !DefaultSchedule.ValidCheck("5m") || DefaultSchedule.ValidCheck("6m") {
		t.Error("ValidCheck")
	}
}

func TestTargetsNamed(t *testing.T) {
	ts := []string{
		"6.1.0-54-amd64/stitch_fix-0123456789abcdef.stitch",
		"6.12.117+deb12-amd64/stitch_fix-00112233445566ff.stitch",
		"6.1.0-54-amd64/stitch_other-fedcba9876543210.stitch",
		"contained/6.1.0-54-amd64/stitch_fix-0123456789abcdef.json",
	}
	for query, want := range map[string]int{
		"stitch_fix":                2, // two kernels: ambiguous
		"6.1.0-54-amd64/stitch_fix": 1,
		"stitch_other":              1,
		"6.12.117+deb12-amd64/stitch_fix-00112233445566ff.stitch": 1,
		"stitch": 0,
		"6.1.0-54-amd64/stitch_fix-0123456789abcdef": 0,
		"6.1.0-54-amd64": 0,
	} {
		if got := TargetsNamed(ts, query); len(got) != want {
			t.Errorf("TargetsNamed(%q) = %v, want %d", query, got, want)
		}
	}
}
