package udiff

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

// files is what a test expects of each file: "OLD>NEW:hunks" plus flags.
func summary(d *Diff) []string {
	var out []string
	for _, f := range d.Files {
		s := f.Old + ">" + f.New + ":" + strings.Repeat("h", len(f.Hunks))
		if f.Rename {
			s += " rename"
		}
		if f.Copy {
			s += " copy"
		}
		if f.Binary {
			s += " binary"
		}
		if f.OldMode != "" || f.NewMode != "" {
			s += " mode " + f.OldMode + "-" + f.NewMode
		}
		out = append(out, s)
	}
	return out
}

func TestParse(t *testing.T) {
	for _, tt := range []struct {
		name, diff string
		want       []string
	}{
		{"git", "diff --git a/fs/x.c b/fs/x.c\nindex 1..2 100644\n--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1 +1 @@\n-a\n+b\n",
			[]string{"fs/x.c>fs/x.c:h"}},
		{"kpatch diff -Nupr", "diff -Nupr src.orig/fs/proc/meminfo.c src/fs/proc/meminfo.c\n" +
			"--- src.orig/fs/proc/meminfo.c\t2023-01-12 11:20:07.184710563 -0500\n" +
			"+++ src/fs/proc/meminfo.c\t2023-01-12 11:20:08.166716386 -0500\n@@ -1,2 +1,3 @@\n a\n+b\n c\n" +
			"diff -Nupr src.orig/kernel/fork.c src/kernel/fork.c\n--- src.orig/kernel/fork.c\t2023\n+++ src/kernel/fork.c\t2023\n@@ -5 +5 @@\n-x\n+y\n",
			[]string{"fs/proc/meminfo.c>fs/proc/meminfo.c:h", "kernel/fork.c>kernel/fork.c:h"}},
		{"space before a timestamp", "--- a/x.c 2023-01-01\n+++ b/x.c 2023-01-01\n@@ -1 +1 @@\n-a\n+b\n", []string{"x.c>x.c:h"}},
		{"name with spaces before a tab", "--- a/my file.c\t\n+++ b/my file.c\t\n@@ -1 +1 @@\n-a\n+b\n", []string{"my file.c>my file.c:h"}},
		{"quoted", "diff --git \"a/t\\tb.c\" \"b/t\\tb.c\"\n--- \"a/t\\tb.c\"\n+++ \"b/t\\303\\244b.c\"\n@@ -1 +1 @@\n-a\n+b\n", nil}, // differ: error below
		{"quoted same", "--- \"a/t\\tb.c\"\n+++ \"b/t\\tb.c\"\n@@ -1 +1 @@\n-a\n+b\n", []string{"t\tb.c>t\tb.c:h"}},
		{"created and deleted", "diff --git a/n.c b/n.c\nnew file mode 100644\nindex 0000000..1\n--- /dev/null\n+++ b/n.c\n@@ -0,0 +1,2 @@\n+x\n+y\n\\ No newline at end of file\n" +
			"diff --git a/o.c b/o.c\ndeleted file mode 100644\n--- a/o.c\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n",
			[]string{">n.c:h mode -100644", "o.c>:h mode 100644-"}},
		{"empty new file, mode change, rename, binary", "diff --git a/e.c b/e.c\nnew file mode 100644\nindex 0000000..e69de29\n" +
			"diff --git a/s.sh b/s.sh\nold mode 100644\nnew mode 100755\n" +
			"diff --git a/x/old.c b/y/new.c\nsimilarity index 100%\nrename from x/old.c\nrename to y/new.c\n" +
			"diff --git a/f.bin b/f.bin\nindex 1..2 100644\nBinary files a/f.bin and b/f.bin differ\n" +
			"diff --git a/g.bin b/g.bin\nindex 1..2 100644\nGIT binary patch\nliteral 5\nMcmZ?b00001\n\nliteral 3\nKcmZ?b0000\n\n",
			[]string{">e.c: mode -100644", "s.sh>s.sh: mode 100644-100755", "x/old.c>y/new.c: rename", "f.bin>f.bin: binary", "g.bin>g.bin: binary"}},
		{"diff -r binary note", "diff -Nupr src.orig/fw.bin src/fw.bin\nBinary files src.orig/fw.bin and src/fw.bin differ\n--- src.orig/x.c\t1\n+++ src/x.c\t1\n@@ -1 +1 @@\n-a\n+b\n",
			[]string{"fw.bin>fw.bin: binary", "x.c>x.c:h"}},
		{"rename with change", "diff --git a/a.c b/b.c\nsimilarity index 90%\nrename from a.c\nrename to b.c\n--- a/a.c\n+++ b/b.c\n@@ -1 +1 @@\n-a\n+b\n",
			[]string{"a.c>b.c:h rename"}},
		{"counts honoured", "--- a/x.c\n+++ b/x.c\n@@ -1,3 +1,3 @@\n a\n--- a/y.c\n+++ b/y.c\n c\n@@ -9 +9 @@\n-z\n+Z\n",
			[]string{"x.c>x.c:hh"}},
		{"blank context and CRLF", "--- a/x.c\r\n+++ b/x.c\r\n@@ -1,3 +1,3 @@\r\n a\r\n\r\n-b\r\n+c\r\n", []string{"x.c>x.c:h"}},
		{"mail around it", "From 0123 Mon Sep 17 00:00:00 2001\nSubject: [PATCH] x\n\nbody\n---\n x.c | 2 +-\n\n--- a/x\n" +
			"diff --git a/x.c b/x.c\n--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n-- \n2.39.2\n\n",
			[]string{"x.c>x.c:h"}},
		{"blank context cut off the end", "--- a/x.c\n+++ b/x.c\n@@ -1,4 +1,4 @@\n-a\n+b\n c\n", []string{"x.c>x.c:h"}},
		{"doubled slashes, dot", "--- a//fs/./x.c\n+++ b//fs/./x.c\n@@ -1 +1 @@\n-a\n+b\n", []string{"fs/x.c>fs/x.c:h"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Parse([]byte(tt.diff))
			if tt.want == nil {
				if !errors.Is(err, ErrBadDiff) {
					t.Fatalf("err %v, want ErrBadDiff", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := summary(d); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("files %q, want %q", got, tt.want)
			}
		})
	}
}

func TestParseDetails(t *testing.T) {
	d, err := Parse([]byte("From x\nSubject: fix\n\nwhy\ndiff -Nupr a/f.c b/f.c\n--- a/f.c\t1\n+++ b/f.c\t1\n@@ -10,4 +10,3 @@ int f(void)\n one\n--- gone\n\n three\n@@ -20 +19,2 @@\n x\n+y\n\\ No newline at end of file\n"))
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"From x", "Subject: fix", "", "why"}; !reflect.DeepEqual(d.Preamble, want) {
		t.Errorf("preamble %q, want %q", d.Preamble, want)
	}
	h := d.Files[0].Hunks
	if len(h) != 2 || h[0].OldStart != 10 || h[0].OldLines != 4 || h[0].NewStart != 10 || h[0].NewLines != 3 || h[1].OldLines != 1 || h[1].NewStart != 19 {
		t.Fatalf("hunks %+v", h)
	}
	if got := h[0].Text(); got != "@@ -10,4 +10,3 @@ int f(void)\n one\n--- gone\n\n three\n" {
		t.Errorf("hunk 1 text %q", got)
	}
	if got := h[1].Lines; !reflect.DeepEqual(got, []string{" x", "+y", `\ No newline at end of file`}) {
		t.Errorf("hunk 2 lines %q", got)
	}
}

func TestParseRefuses(t *testing.T) {
	for name, tt := range map[string]struct{ diff, says string }{
		"empty":          {"", "no file"},
		"prose":          {"just text\n--- a/x\nmore\n", "no file"},
		"no hunks":       {"--- a/x.c\n+++ b/x.c\n", "no '@@' hunk"},
		"truncated":      {"--- a/x.c\n+++ b/x.c\n@@ -1,3 +1,3 @@\n a\n-b\n", "truncated"},
		"cut mid-diff":   {"--- a/x.c\n+++ b/x.c\n@@ -1,3 +1,2 @@\n-a\n+b\n c\n--- a/y.c\n+++ b/y.c\n@@ -1 +1 @@\n-a\n+b\n", "outside any file"},
		"cut 4 lines":    {"--- a/x.c\n+++ b/x.c\n@@ -1,5 +1,5 @@\n-a\n+b\n", "truncated"},
		"garbage":        {"--- a/x.c\n+++ b/x.c\n@@ -1,2 +1,2 @@\n a\n?b\n+c\n", "ends early"},
		"too long":       {"--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n-b\n+c\n", "more lines"},
		"stray hunk":     {"--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\ntext\n@@ -5 +5 @@\n-c\n+d\n", "outside any file"},
		"dotdot":         {"--- a/../x.c\n+++ b/../x.c\n@@ -1 +1 @@\n-a\n+b\n", "'..'"},
		"inner dotdot":   {"--- a/fs/../../x.c\n+++ b/fs/../../x.c\n@@ -1 +1 @@\n-a\n+b\n", "'..'"},
		"absolute":       {"--- /usr/src/x.c\n+++ /usr/src/x.c\n@@ -1 +1 @@\n-a\n+b\n", "absolute"},
		"no component":   {"--- x.c\n+++ x.c\n@@ -1 +1 @@\n-a\n+b\n", "no leading directory"},
		"names differ":   {"--- a/x.c\n+++ b/y.c\n@@ -1 +1 @@\n-a\n+b\n", "same file"},
		"both /dev/null": {"--- /dev/null\n+++ /dev/null\n@@ -0,0 +1 @@\n+a\n", "both"},
		"context diff":   {"*** a/x.c\n--- b/x.c\n***************\n*** 1 ****\n! a\n--- 1 ----\n! b\n", "context diff"},
		"huge figures":   {"--- a/x.c\n+++ b/x.c\n@@ -1,99999999999999999999 +1 @@\n-a\n", "too large"},
		"bad quote":      {"--- \"a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-a\n+b\n", "closing quote"},
		"git rename out": {"diff --git a/x.c b/y.c\nrename from x.c\nrename to ../y.c\n", "'..'"},
		"git hunk alone": {"diff --git a/x.c b/x.c\n@@ -1 +1 @@\n-a\n+b\n", "without '---'"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Parse([]byte(tt.diff))
			if !errors.Is(err, ErrBadDiff) || !strings.Contains(err.Error(), tt.says) {
				t.Fatalf("err %v, want ErrBadDiff saying %q", err, tt.says)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("--- a/f.c\n+++ b/f.c\n@@ -10,3 +10,3 @@\n a\n-b\n+B\n c\n"))
	f.Add([]byte("--- /dev/null\n+++ b/n.c\n@@ -0,0 +1 @@\n+x\n\\ No newline at end of file\n"))
	f.Add([]byte("diff -Nupr src.orig/a/b.c src/a/b.c\n--- src.orig/a/b.c\t2023-01-12 11:20:07.1 -0500\n+++ src/a/b.c\t2023-01-12\n@@ -1 +1,2 @@\n a\n+\n"))
	f.Add([]byte("diff --git \"a/q\\\"x\" \"b/q\\\"x\"\nold mode 100644\nnew mode 100755\ndiff --git a/x b/y\nrename from x\nrename to y\n"))
	f.Add([]byte("diff --git a/g b/g\nGIT binary patch\nliteral 1\nIc\n\n"))
	f.Fuzz(func(t *testing.T, diff []byte) {
		d, err := Parse(diff)
		if err != nil {
			if !errors.Is(err, ErrBadDiff) {
				t.Fatalf("error %v is not ErrBadDiff", err)
			}
			return
		}
		if len(d.Files) == 0 {
			t.Fatal("no files and no error")
		}
		for _, fl := range d.Files {
			if fl.Path() == "" {
				t.Fatalf("file without a name: %+v", fl)
			}
			for _, p := range []string{fl.Old, fl.New} {
				if strings.HasPrefix(p, "/") || p == ".." || strings.HasPrefix(p, "../") || strings.Contains(p, "/../") || strings.HasSuffix(p, "/..") {
					t.Fatalf("path %q leaves the tree", p)
				}
			}
			for _, h := range fl.Hunks {
				old, new := 0, 0
				for _, l := range h.Lines {
					switch {
					case strings.HasPrefix(l, "-"):
						old++
					case strings.HasPrefix(l, "+"):
						new++
					case strings.HasPrefix(l, `\`):
					default:
						old++
						new++
					}
				}
				if old != h.OldLines || new != h.NewLines {
					t.Fatalf("hunk %q holds %d old and %d new lines", h.Header, old, new)
				}
			}
		}
	})
}
