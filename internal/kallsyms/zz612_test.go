package kallsyms

import (
	"context"
	"testing"
)

func TestK612(t *testing.T) {
	im, err := OpenImage(context.Background(), "/var/cache/stitch/kernels/6.12.117+deb12-amd64/root/boot/vmlinuz-6.12.117+deb12-amd64", "/var/cache/stitch", nil)
	if err != nil {
		t.Fatal(err)
	}
	b, s, err := im.Bytes("cmdline_proc_show", 0)
	t.Logf("%x %+v %v", b, s, err)
	t.Logf("%d syms", len(im.Table.Symbols()))
	for i, s := range im.Table.Symbols() {
		if i < 5 || (s.Name >= "cmdline_p" && s.Name < "cmdline_q") {
			t.Logf("%+v", s)
		}
	}
}
