package klpmod

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stitchpatch/stitch/internal/elfobj"
	"github.com/stitchpatch/stitch/internal/testutils"
)

// kernelStubs are the few kernel declarations the kit's headers need, so
// that they compile with gcc alone; the real build uses the kernel's.
var kernelStubs = map[string]string{
	"linux/compiler.h": `#define __used __attribute__((__used__))
#define __section(s) __attribute__((__section__(s)))
#define __aligned(n) __attribute__((__aligned__(n)))
#define ___PASTE(a, b) a##b
#define __PASTE(a, b) ___PASTE(a, b)
#define __UNIQUE_ID(p) __PASTE(__PASTE(__UNIQUE_ID_, p), __COUNTER__)
#define WRITE_ONCE(x, v) ((x) = (v))
`,
	"linux/stddef.h":    "#define NULL ((void *)0)\ntypedef _Bool bool;\n#define true 1\n#define false 0\n",
	"linux/mutex.h":     "struct mutex { int locked; };\nvoid mutex_lock(struct mutex *);\nvoid mutex_unlock(struct mutex *);\n",
	"linux/module.h":    "#define EINVAL 22\nenum module_state { MODULE_STATE_LIVE, MODULE_STATE_COMING, MODULE_STATE_GOING };\nstruct module { enum module_state state; void (*exit)(void); };\nextern struct module __this_module;\n#define THIS_MODULE (&__this_module)\nvoid __module_get(struct module *);\nvoid module_put(struct module *);\n",
	"linux/jiffies.h":   "extern unsigned long volatile jiffies;\n",
	"linux/printk.h":    "int printk(const char *fmt, ...);\nint printk_deferred(const char *fmt, ...);\n",
	"linux/gfp.h":       "#ifndef GFP_KERNEL\ntypedef unsigned int gfp_t;\n#define GFP_KERNEL 0xcc0u\n#endif\n",
	"linux/livepatch.h": "#ifndef STUB_LIVEPATCH\n#define STUB_LIVEPATCH\n#include <linux/gfp.h>\nstruct module;\nstruct klp_object { struct module *mod; };\nvoid *klp_shadow_get(void *obj, unsigned long id);\nvoid *klp_shadow_alloc(void *obj, unsigned long id, unsigned long size, gfp_t gfp, void *ctor, void *data);\nvoid *klp_shadow_get_or_alloc(void *obj, unsigned long id, unsigned long size, gfp_t gfp, void *ctor, void *data);\nvoid klp_shadow_free(void *obj, unsigned long id, void *dtor);\nvoid klp_shadow_free_all(unsigned long id, void *dtor);\n#endif\n",
}

// compileWithKit compiles src with the kit's headers (and the kernel
// stubs) on the include path, as kernel code.
func compileWithKit(t testing.TB, src string) []byte {
	t.Helper()
	dir := t.TempDir()
	inc := filepath.Join(dir, "include")
	if err := WriteIncludes(inc); err != nil {
		t.Fatal(err)
	}
	for name, body := range kernelStubs {
		p := filepath.Join(dir, "stubs", name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c := filepath.Join(dir, "f.c")
	if err := os.WriteFile(c, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return testutils.CompileObject(t, c, "-I"+inc, "-I"+filepath.Join(dir, "stubs"))
}

// The kit's headers leave records FindKit reads: kpatch's callback
// macros (for the file's own object), stitch/hooks.h's callbacks (for the
// object they name), shadow ids and data updated in place.
func TestFindKit(t *testing.T) {
	obj := compileWithKit(t, `#include "kpatch-macros.h"
#include <stitch/hooks.h>

static int pre(patch_object *obj) { return obj != 0; }
KPATCH_PRE_PATCH_CALLBACK(pre);
static void post_unpatch(patch_object *obj) { (void)obj; }
KPATCH_POST_UNPATCH_CALLBACK(post_unpatch);

static void going(struct klp_object *obj) { (void)obj; }
STITCH_PRE_UNPATCH(joydev, going);

STITCH_SHADOW(counter, 0x17, unsigned int);
STITCH_SHADOW(flag, 0x5, char);
int use(void *o) { unsigned int *c = counter_get_or_alloc(o, GFP_KERNEL); return c && flag_get(o); }

extern int pipe_max_size;
STITCH_UPDATES_DATA(pipe_max_size);

extern int xmit(int);
STITCH_REDIRECTS(xmit);
int (*copy_of_xmit(void))(int) { return STITCH_NEW(xmit); }

STITCH_CARRIES_INIT(null_init);
static void fixed_exit(void) { }
static struct stitch_exit exit_fix = { .fixed = fixed_exit };
static int install(struct klp_object *obj) { return stitch_replace_exit(obj, &exit_fix); }
STITCH_PRE_PATCH(ebtable_filter, install);
static void restore(struct klp_object *obj) { stitch_restore_exit(obj, &exit_fix); }
STITCH_POST_UNPATCH(ebtable_filter, restore);
`)
	k, err := FindKit(obj)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range k.Callbacks {
		got = append(got, c.Kind+":"+c.Object+":"+c.Func)
	}
	slices.Sort(got)
	want := []string{"post_unpatch::post_unpatch", "post_unpatch:ebtable_filter:__stitch_post_unpatch__ebtable_filter", "pre_patch::pre", "pre_patch:ebtable_filter:__stitch_pre_patch__ebtable_filter", "pre_unpatch:joydev:__stitch_pre_unpatch__joydev"}
	if !slices.Equal(got, want) {
		t.Errorf("callbacks %v, want %v", got, want)
	}
	if !slices.Equal(k.Shadows, []uint64{0x5, 0x17}) {
		t.Errorf("shadows %#x, want 0x5 0x17", k.Shadows)
	}
	if !slices.Equal(k.Updates, []string{"pipe_max_size"}) {
		t.Errorf("updates %v", k.Updates)
	}
	if !slices.Equal(k.Redirects, []string{"xmit"}) {
		t.Errorf("redirects %v, want xmit", k.Redirects)
	}
	// STITCH_NEW(xmit) is the patch's global alias of its copy.
	o, err := elfobj.Parse(obj)
	if err != nil {
		t.Fatal(err)
	}
	if s := o.Symbol(NewPrefix + "xmit"); s == nil || s.Defined() {
		t.Errorf("STITCH_NEW(xmit) does not refer to an undefined %sxmit: %+v", NewPrefix, s)
	}
	if !slices.Equal(k.Carries, []string{"null_init"}) {
		t.Errorf("carries %v", k.Carries)
	}
}

// KPATCH_FORCE_UNSAFE does not compile: Stitch never skips the
// consistency model.
func TestKpatchForceUnsafeRefused(t *testing.T) {
	cc, err := exec.LookPath("gcc")
	if err != nil {
		testutils.Unavailable(t, "gcc not installed")
	}
	dir := t.TempDir()
	inc := filepath.Join(dir, "include")
	if err := WriteIncludes(inc); err != nil {
		t.Fatal(err)
	}
	for name, body := range kernelStubs {
		p := filepath.Join(dir, "stubs", name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, []byte(body), 0o644)
	}
	c := filepath.Join(dir, "f.c")
	os.WriteFile(c, []byte("#include <linux/gfp.h>\n#include \"kpatch-macros.h\"\nint f(void) { return 0; }\nKPATCH_FORCE_UNSAFE(f);\n"), 0o644)
	out, err := exec.Command(cc, "-c", "-I"+inc, "-I"+filepath.Join(dir, "stubs"), "-o", filepath.Join(dir, "f.o"), c).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "never skips livepatch's consistency model") {
		t.Errorf("KPATCH_FORCE_UNSAFE compiled (%v):\n%s", err, out)
	}
}

// An object with no kit records declares nothing; a malformed record is
// an error, not a guess.
func TestFindKitNothingAndMalformed(t *testing.T) {
	k, err := FindKit(compileWithKit(t, "int f(void) { return 1; }\n"))
	if err != nil || len(k.Callbacks)+len(k.Shadows)+len(k.Updates) != 0 {
		t.Errorf("plain object: %+v, %v", k, err)
	}
	_, err = FindKit(compileWithKit(t, `int f(void) { return 1; }
static int x __attribute__((used, section(".stitch.callbacks.pre_load"))) = 1;
`))
	if !errors.Is(err, ErrHooks) || !strings.Contains(err.Error(), "pre_load") {
		t.Errorf("unknown callback kind: %v", err)
	}
	_, err = FindKit(compileWithKit(t, `int v;
static int *p __attribute__((used, section(".stitch.callbacks.pre_patch"), aligned(8))) = &v;
`))
	if !errors.Is(err, ErrHooks) {
		t.Errorf("callback record pointing at data: %v", err)
	}
}

// The registration wires callbacks per object, and frees the shadow
// variables in vmlinux's post-unpatch callback after the author's, adding
// a vmlinux object when the patch has none.
func TestWriteHookCallbacks(t *testing.T) {
	m := &Module{
		Name: "p",
		Objects: []HookObject{
			{Name: "joydev", Funcs: []HookFunc{{OldName: "joydev_open", Alias: "__stitch_fn_0_0"}},
				Callbacks: map[string]string{PrePatch: "__stitch_fn_0_1", "post_patch": "__stitch_post_patch__joydev"}},
		},
		Shadows: []uint64{0x17},
	}
	var b bytes.Buffer
	writeHook(&b, m)
	out := b.String()
	for _, want := range []string{
		"extern int __stitch_fn_0_1(struct klp_object *);",
		"extern void __stitch_post_patch__joydev(struct klp_object *);",
		"{ .name = NULL /* vmlinux */, .funcs = funcs_0,\n\t  .callbacks = { .post_unpatch = stitch_free_shadows } },",
		"{ .name = \"joydev\", .funcs = funcs_1,\n\t  .callbacks = { .pre_patch = __stitch_fn_0_1, .post_patch = __stitch_post_patch__joydev } },",
		"static void stitch_free_shadows(struct klp_object *obj)\n{\n\tklp_shadow_free_all(0x17, NULL);\n}",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("registration lacks %q:\n%s", want, out)
		}
	}
	// With the author's own post-unpatch for vmlinux: it runs first.
	m.Objects = append(m.Objects, HookObject{Name: "vmlinux", Callbacks: map[string]string{PostUnpatch: "__stitch_post_unpatch__vmlinux"}})
	b.Reset()
	writeHook(&b, m)
	if want := "{\n\t__stitch_post_unpatch__vmlinux(obj);\n\tklp_shadow_free_all(0x17, NULL);\n}"; !strings.Contains(b.String(), want) {
		t.Errorf("registration does not chain the author's post-unpatch:\n%s", b.String())
	}
	if strings.Count(b.String(), ".name = NULL") != 1 {
		t.Errorf("two vmlinux objects:\n%s", b.String())
	}
}

// FindKit reads objects a fix's build made, which a fix author controls:
// any bytes give a Kit or an error, never a panic.
func FuzzFindKit(f *testing.F) {
	f.Add(compileWithKit(f, `#include "kpatch-macros.h"
#include <stitch/hooks.h>
static int pre(patch_object *obj) { return obj != 0; }
KPATCH_PRE_PATCH_CALLBACK(pre);
static void going(struct klp_object *obj) { (void)obj; }
STITCH_POST_UNPATCH(vmlinux, going);
STITCH_SHADOW(counter, 0x17, unsigned int);
extern int limit;
STITCH_UPDATES_DATA(limit);
`))
	f.Fuzz(func(t *testing.T, obj []byte) {
		k, err := FindKit(obj)
		if err == nil && k == nil {
			t.Fatal("no kit and no error")
		}
	})
}
