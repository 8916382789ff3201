package kbuild

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// The head and tail of command files 6.1.190's kbuild wrote in the
// prepared tree: a built-in object, an object of a composite module
// (fs/xfs/xfs.ko) and one of a module in a subdirectory.
func TestParseCmdFileReal(t *testing.T) {
	for _, c := range []struct {
		file, object string
		want         ObjectFacts
	}{
		{"fs_proc_.cmdline.o.cmd", "fs/proc/cmdline.o", ObjectFacts{Object: "fs/proc/cmdline.o", ModNames: []string{"proc"}, ModFile: "fs/proc/proc"}},
		{"fs_xfs_.xfs_iops.o.cmd", "fs/xfs/xfs_iops.o", ObjectFacts{Object: "fs/xfs/xfs_iops.o", Module: true, ModNames: []string{"xfs"}}},
		{"drivers_block_null_blk_.main.o.cmd", "drivers/block/null_blk/main.o", ObjectFacts{Object: "drivers/block/null_blk/main.o", Module: true, ModNames: []string{"null_blk"}}},
	} {
		b, err := os.ReadFile(filepath.Join("testdata", "cmd", c.file))
		if err != nil {
			t.Fatal(err)
		}
		got, err := ParseCmdFile(b, c.object)
		if err != nil || !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: %+v, %v; want %+v", c.file, got, err, c.want)
		}
		// The file names its own object only.
		if _, err := ParseCmdFile(b, "fs/other.o"); !errors.Is(err, ErrCmdFile) {
			t.Errorf("%s read for another object: %v", c.file, err)
		}
	}
	if got := (ObjectFacts{Module: true, ModNames: []string{"xfs"}}).Objects(); !reflect.DeepEqual(got, []string{"xfs"}) {
		t.Errorf("objects of a modular object: %v", got)
	}
	if got := (ObjectFacts{ModNames: []string{"proc"}}).Objects(); !reflect.DeepEqual(got, []string{Vmlinux}) {
		t.Errorf("objects of a built-in object: %v", got)
	}
}

func TestParseCmdFile(t *testing.T) {
	const obj = "drivers/x/y.o"
	line := func(cmd string) []byte {
		return []byte("cmd_" + obj + " := " + cmd + "\n\nsource_" + obj + " := drivers/x/y.c\n")
	}
	for _, c := range []struct {
		name, cmd string
		want      *ObjectFacts // nil: an error
	}{
		{"shared by two modules", `gcc -DMODULE -DKBUILD_BASENAME='"y"' -DKBUILD_MODNAME='"a_b:c"' -c -o drivers/x/y.o drivers/x/y.c ; objtool --module drivers/x/y.o`,
			&ObjectFacts{Object: obj, Module: true, ModNames: []string{"a_b", "c"}}},
		{"double quotes and escapes", `gcc -DKBUILD_MODFILE="\"drivers/x/xx\"" -DKBUILD_MODNAME=\"xx\" -c -o drivers/x/y.o drivers/x/y.c`,
			&ObjectFacts{Object: obj, ModNames: []string{"xx"}, ModFile: "drivers/x/xx"}},
		// Flags of later commands are not the compiler's.
		{"after ;", `gcc -DKBUILD_MODNAME='"y"' -c -o drivers/x/y.o drivers/x/y.c ; true -DMODULE`,
			&ObjectFacts{Object: obj, ModNames: []string{"y"}}},
		{"make escapes", `gcc -DKBUILD_MODNAME='"y"' -DX='$$(a)\#' -c -o drivers/x/y.o drivers/x/y.c`,
			&ObjectFacts{Object: obj, ModNames: []string{"y"}}},
		{"no KBUILD_MODNAME", `gcc -DMODULE -c -o drivers/x/y.o drivers/x/y.c`, nil},
		{"a link, not a compilation", `ld -r -o drivers/x/z.o drivers/x/y.o`, nil},
		{"KBUILD_MODNAME after ;", `gcc -c -o drivers/x/y.o drivers/x/y.c; cc -DKBUILD_MODNAME='"y"'`, nil},
		{"not a string", `gcc -DKBUILD_MODNAME=y -c -o drivers/x/y.o drivers/x/y.c`, nil},
		{"bad module name", `gcc -DKBUILD_MODNAME='"a-b"' -c -o drivers/x/y.o drivers/x/y.c`, nil},
		{"empty in a list", `gcc -DKBUILD_MODNAME='"a::b"' -c -o drivers/x/y.o drivers/x/y.c`, nil},
		{"unterminated quote", `gcc -DKBUILD_MODNAME='"y" -c -o drivers/x/y.o drivers/x/y.c`, nil},
	} {
		got, err := ParseCmdFile(line(c.cmd), obj)
		switch {
		case c.want == nil && !errors.Is(err, ErrCmdFile):
			t.Errorf("%s: %+v, %v; want ErrCmdFile", c.name, got, err)
		case c.want != nil && (err != nil || !reflect.DeepEqual(got, *c.want)):
			t.Errorf("%s: %+v, %v; want %+v", c.name, got, err, *c.want)
		}
	}
	// 6.12's kbuild names the line savedcmd_.
	saved := append([]byte("saved"), line(`gcc -DKBUILD_MODNAME='"y"' -c -o drivers/x/y.o drivers/x/y.c`)...)
	if got, err := ParseCmdFile(saved, obj); err != nil || !reflect.DeepEqual(got.ModNames, []string{"y"}) {
		t.Errorf("savedcmd_ line: %+v, %v", got, err)
	}
	if _, err := ParseCmdFile(nil, obj); !errors.Is(err, ErrCmdFile) || !strings.Contains(err.Error(), "cmd_"+obj) {
		t.Errorf("empty file: %v", err)
	}
}

// FuzzParseCmdFile: any contents give facts or an error, never a panic,
// and facts always name at least one valid module, as the build relies on.
func FuzzParseCmdFile(f *testing.F) {
	for _, name := range []string{"fs_proc_.cmdline.o.cmd", "fs_xfs_.xfs_iops.o.cmd"} {
		b, err := os.ReadFile(filepath.Join("testdata", "cmd", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, strings.TrimPrefix(strings.Fields(string(b))[0], "cmd_"))
	}
	f.Add([]byte(`cmd_a.o := gcc -DMODULE "-DKBUILD_MODNAME=\"a:b\"" -o a.o`), "a.o")
	f.Fuzz(func(t *testing.T, data []byte, object string) {
		facts, err := ParseCmdFile(data, object)
		if err != nil {
			if !errors.Is(err, ErrCmdFile) {
				t.Fatalf("error without ErrCmdFile: %v", err)
			}
			return
		}
		if facts.Object != object || len(facts.ModNames) == 0 || len(facts.Objects()) == 0 {
			t.Fatalf("facts %+v", facts)
		}
		for _, n := range facts.ModNames {
			if !modName(n) {
				t.Fatalf("module name %q accepted", n)
			}
		}
	})
}

// The facts of an object compiled in the real tree, read through the
// tree's lock: built-in fs/proc/version.o.
func TestObjectFactsCompiled(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles a kernel object")
	}
	tree := testTree(t)
	ctx := context.Background()
	if _, err := tree.CompileObject(ctx, "fs/proc/version.o", ""); err != nil {
		t.Fatal(err)
	}
	got, err := tree.ObjectFacts(ctx, "fs/proc/version.o")
	want := ObjectFacts{Object: "fs/proc/version.o", ModNames: []string{"proc"}, ModFile: "fs/proc/proc"}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("facts of fs/proc/version.o: %+v, %v; want %+v", got, err, want)
	}
	if _, err := tree.ObjectFacts(ctx, "fs/proc/no_such_object.o"); !errors.Is(err, ErrCmdFile) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an object never compiled: %v", err)
	}
	if _, err := tree.ObjectFacts(ctx, "../etc/passwd.o"); !errors.Is(err, ErrCmdFile) {
		t.Errorf("a path outside the tree: %v", err)
	}
}
