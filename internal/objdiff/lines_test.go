package objdiff

import "testing"

// What counts as a moved line in a string literal, given the line table's
// evidence (code at x86.c:8495 now at 8496; line 12 ambiguous).
func TestLiteralLinesOnly(t *testing.T) {
	l := &lineShifts{loaded: true, moved: map[int]map[string]int{
		8495: {"arch/x86/kvm/x86.c": 8496},
		12:   {"arch/x86/kvm/x86.c": -1},
	}}
	for _, tt := range []struct {
		a, b string
		want bool
	}{
		{`field "x" at arch/x86/kvm/x86.c:8495`, `field "x" at arch/x86/kvm/x86.c:8496`, true},
		{`at x86.c:8495 and more`, `at x86.c:8496 and more`, true},                    // the file as a suffix
		{`at arch/x86/kvm/x86.c:8495`, `at arch/x86/kvm/x86.c:8497`, false},           // not where the code went
		{`at arch/x86/kvm/mmu.c:8495`, `at arch/x86/kvm/mmu.c:8496`, false},           // another file's line
		{`at arch/x86/kvm/x86.c:12`, `at arch/x86/kvm/x86.c:13`, false},               // ambiguous evidence
		{`at arch/x86/kvm/x86.c:8495`, `at arch/x86/kvm/x86.c:8495`, false},           // nothing moved
		{`at arch/x86/kvm/x86.c:8495 size`, `at arch/x86/kvm/x86.c:8496 SIZE`, false}, // other text changed
		{`a x86.c:8495`, `b x86.c:8496`, false},                                       // text before changed
		{`no line here`, `no line there`, false},
	} {
		if got := l.literalLinesOnly(tt.a, tt.b); got != tt.want {
			t.Errorf("%q -> %q: %v, want %v", tt.a, tt.b, got, tt.want)
		}
	}
	var none *lineShifts
	if none.movedTo("", 1, 2) {
		t.Error("no evidence, yet moved")
	}
}
