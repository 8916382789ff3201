#!/usr/bin/env bash
# cut.sh cuts a fix corpus (index.tsv and fixes/NAME.patch, the form of
# corpus/6.1) from two consecutive Debian kernel source packages: every C
# file that differs between them is a candidate fix, kept if the kernel's
# own prepared tree compiles it alone with the change applied and the
# object is part of that kernel (vmlinux or a module the package ships).
# See usage below and corpus/6.12/README.md for what each step checks.
set -euo pipefail
export LC_ALL=C # sort and comm must agree on order

prog=corpus/cut.sh
usage() {
	cat >&2 <<EOF
usage: $prog OLD_VERSION NEW_VERSION RELEASE OUTDIR

Cuts a fix corpus from two Debian linux-source-SERIES packages.

  OLD_VERSION  version of the source package RELEASE was built from,
               e.g. 6.12.115-2~deb12u1; the fixes are diffs against it
  NEW_VERSION  the next version, e.g. 6.12.117-1~deb12u1
  RELEASE      the kernel the corpus is measured on, already added with
               'stitch kernel add RELEASE', e.g. 6.12.115+deb12-amd64
  OUTDIR       the corpus directory, e.g. corpus/6.12; its index.tsv and
               fixes/ are replaced, anything else in it is left alone

Environment:
  WORK          scratch directory (default /tmp/corpus-cut-RELEASE); needs
                about 6 GB: both source trees and a copy of the prepared one
  STITCH        stitch binary (default: built from this repository)
  STITCH_CACHE  stitch's cache (default /var/cache/stitch)
  ONLY          an extended regular expression: only the changed files
                whose path matches it (a quick check of this script)

Progress goes to stderr; the counts of each step end it and are written
to WORK/summary.txt, the dropped files with their reasons to
WORK/dropped.tsv. Compiles one object at a time (no make -j).
EOF
	exit 2
}

die() {
	echo "$prog: $*" >&2
	exit 1
}
say() { echo "$prog: $*" >&2; }

[[ $# -eq 4 ]] || usage
old_version=$1 new_version=$2 release=$3 outdir=$4
for v in "$old_version" "$new_version"; do
	[[ $v =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?-[0-9A-Za-z.+~]+$ ]] ||
		die "version '$v' is not a Debian kernel version like 6.12.115-2~deb12u1"
done
series=$(cut -d. -f1,2 <<<"${old_version%%-*}")
[[ $(cut -d. -f1,2 <<<"${new_version%%-*}") == "$series" ]] ||
	die "$old_version and $new_version are not of the same series ($series)"
[[ $old_version != "$new_version" ]] || die "OLD_VERSION and NEW_VERSION are the same"
[[ $release =~ ^[0-9A-Za-z.+_-]+$ ]] || die "release '$release' is not a kernel release like 6.12.115+deb12-amd64"
pkg=linux-source-$series

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${STITCH_CACHE:-/var/cache/stitch}
work=${WORK:-/tmp/corpus-cut-$release}
kroot=$cache/kernels/$release/root
moddir=$kroot/lib/modules/$release
for f in "$kroot/boot/vmlinuz-$release" "$moddir/modules.builtin"; do
	[[ -e $f ]] || die "$f is missing: run 'stitch kernel add $release' first"
done
for tool in dpkg-deb tar xz diff make nm awk; do
	command -v "$tool" >/dev/null || die "$tool is not installed (scripts/install-deps.sh installs what Stitch needs)"
done
mkdir -p "$work" || die "cannot create the scratch directory $work (set WORK)"
start=$(date +%s)

# 1. The two source trees, unpacked once into $work/src-VERSION.
unpack() { # version -> prints the tree's directory
	local v=$1 dir=$work/src-$1 deb
	if [[ -e $dir/.unpacked ]]; then
		echo "$dir"
		return
	fi
	deb=$cache/debs/${pkg}_${v}_all.deb
	if [[ ! -e $deb ]]; then
		deb=$work/${pkg}_${v}_all.deb
		if [[ ! -e $deb ]]; then
			say "fetching $pkg=$v (not in $cache/debs)"
			(cd "$work" && apt-get download "$pkg=$v" >&2) ||
				die "cannot fetch $pkg=$v: is the version right and in the apt sources?"
			[[ -e $deb ]] || die "apt-get download left no $deb"
		fi
	fi
	say "unpacking $deb into $dir"
	rm -rf "$dir" "$dir.tmp"
	mkdir -p "$dir.tmp"
	dpkg-deb --fsys-tarfile "$deb" | tar -xOf - "./usr/src/$pkg.tar.xz" | tar -xJf - -C "$dir.tmp" ||
		die "cannot unpack ./usr/src/$pkg.tar.xz from $deb"
	[[ -e $dir.tmp/$pkg/Makefile ]] || die "$deb holds no $pkg/Makefile"
	mv "$dir.tmp/$pkg" "$dir"
	rmdir "$dir.tmp"
	touch "$dir/.unpacked"
	echo "$dir"
}
old=$(unpack "$old_version")
new=$(unpack "$new_version")

# 2. Candidates: the C files that differ, in scope (built for x86-64).
say "comparing the trees"
changed=$work/changed.txt dropped=$work/dropped.tsv
: >"$dropped"
drop() { printf '%s\t%s\n' "$1" "$2" >>"$dropped"; }
# diff -rq prints "Files OLD/x and NEW/x differ" or "Only in DIR: name".
diff -rq "$old" "$new" | awk -v o="$old/" -v n="$new/" '
	/^Files / && / differ$/ { f = substr($2, length(o) + 1); if (f ~ /\.c$/) print "M\t" f; next }
	/^Only in / {
		d = substr($3, 1, length($3) - 1) "/" $4
		side = index(d, o) == 1 ? "old" : "new"
		f = side == "old" ? substr(d, length(o) + 1) : substr(d, length(n) + 1)
		if (f ~ /\.c$/) print (side == "old" ? "D" : "A") "\t" f
	}' | sort -k2 >"$changed" || true
if [[ -n ${ONLY:-} ]]; then
	grep -E -- "$ONLY" "$changed" >"$changed.only" || die "no changed C file matches ONLY='$ONLY'"
	mv "$changed.only" "$changed"
fi
total=$(wc -l <"$changed")
[[ $total -gt 0 ]] || die "no C file differs between $old_version and $new_version"
candidates=()
while IFS=$'\t' read -r kind f; do
	case $f in
	tools/* | scripts/* | samples/* | Documentation/* | usr/*)
		drop "$f" "out of scope: not kernel code"
		continue
		;;
	arch/x86/*) ;;
	arch/*)
		drop "$f" "out of scope: another architecture"
		continue
		;;
	esac
	case $kind in
	A) drop "$f" "new file: not a change of an existing object" ;;
	D) drop "$f" "file removed: not a change of an existing object" ;;
	M) candidates+=("$f") ;;
	esac
done <"$changed"
say "$total C files differ; ${#candidates[@]} candidates in scope"

# 3. A private copy of the kernel's prepared tree.
if [[ -z ${STITCH:-} ]]; then
	STITCH=$work/stitch
	say "building stitch into $STITCH"
	(cd "$repo" && CGO_ENABLED=0 go build -o "$STITCH" ./cmd/stitch) || die "cannot build stitch from $repo"
fi
shared=$cache/kernel/$release
stamp_want="$pkg $old_version"
if [[ $(head -1 "$shared/.stitch-prepared" 2>/dev/null) != "$stamp_want" ]]; then
	say "preparing $shared with stitch build (once per release, a few minutes)"
	# Building the demo fix prepares the tree; the build's own result does
	# not matter here, only the stamp it leaves.
	"$STITCH" build --kernel "$release" -o "$work/prepare-out" "$repo/internal/demo/fix/cmdline.patch" >&2 || true
	[[ $(head -1 "$shared/.stitch-prepared" 2>/dev/null) == "$stamp_want" ]] ||
		die "$shared is not a prepared $stamp_want tree: is $old_version the source of $release? ('stitch kernel list' shows it)"
fi
tree=$work/tree
if [[ $(head -1 "$tree/.stitch-prepared" 2>/dev/null) != "$stamp_want" ]]; then
	say "copying the prepared tree $shared to $tree"
	rm -rf "$tree"
	cp -a "$shared" "$tree"
fi
cctext=$(sed -n 2p "$tree/.stitch-prepared")
cc=${cctext%% *}
[[ -n $cc && $($cc --version 2>/dev/null | head -1) == "$cctext" ]] || cc=gcc
[[ $($cc --version 2>/dev/null | head -1) == "$cctext" ]] || die "the kernel was built with '$cctext', which is not installed"
kcflags="-ffunction-sections -fdata-sections" # as stitch compiles objects

# The modules the package ships, by module name ('-' as '_').
shipped=$work/shipped.txt
find "$moddir/kernel" -name '*.ko*' -printf '%f\n' | sed -E 's/\.ko(\.[a-z]+)?$//; s/-/_/g' | sort -u >"$shipped"
# The kernel's symbols, decoded from its boot image's kallsyms tables
# (Debian's System.map is a placeholder pointing at the -dbg package).
"$STITCH" kallsyms -image "$release" | awk '{print $3}' | sort -u >"$work/ksyms.txt"
[[ $(wc -l <"$work/ksyms.txt") -gt 1000 ]] || die "stitch kallsyms -image $release printed no symbol table"

# facts OBJ -> "module NAMES" or "vmlinux MODFILE", from kbuild's .o.cmd
# (the savedcmd_ or cmd_ line: -DMODULE and -DKBUILD_MODNAME, as
# internal/kbuild's ObjectFacts reads them).
facts() {
	local obj=$1 cmd line
	cmd=$tree/$(dirname "$obj")/.$(basename "$obj").cmd
	# (an object of a directory kbuild does not descend into is compiled
	# from the top as ./DIR/NAME.o)
	line=$(grep -m1 -E "^(saved)?cmd_(\./)?$obj := " "$cmd") || return 1
	local name modfile module=vmlinux
	# -DKBUILD_MODNAME='"act_csum"' (quoting as make wrote it)
	name=$(grep -oE -- "-DKBUILD_MODNAME=[^ ]+" <<<"$line" | head -1 | sed -E 's/^[^=]*=//; s/[^A-Za-z0-9_:]//g')
	[[ -n $name ]] || return 1
	[[ $line =~ (^|[[:space:]])-DMODULE([[:space:]]|$) ]] && module=module
	modfile=$(grep -oE -- "-DKBUILD_MODFILE=[^ ]+" <<<"$line" | head -1 | sed -E 's/^[^=]*=//; s/[^A-Za-z0-9_\/,.-]//g' || true)
	if [[ $module == module ]]; then echo "module ${name//:/ }"; else echo "vmlinux $modfile"; fi
}

# builtin_share OBJ -> "FOUND/TOTAL": how many of the object's functions
# are in the kernel's kallsyms (an object of a disabled option compiles
# too, as built-in, but none of its functions is in the kernel).
builtin_share() {
	local syms
	syms=$(nm --defined-only "$tree/$1" | awk '$2 ~ /^[tT]$/ && $3 !~ /^__(pfx|cfi)_/ && $3 !~ /\./ {print $3}' | sort -u)
	if [[ -z $syms ]]; then # no function: its data then
		syms=$(nm --defined-only "$tree/$1" | awk '$2 ~ /^[dDbBrR]$/ && $3 !~ /^__/ && $3 !~ /\./ {print $3}' | sort -u)
	fi
	local n f
	n=$(grep -c . <<<"$syms" || true)
	f=$(comm -12 <(echo "$syms") "$work/ksyms.txt" | grep -c . || true)
	echo "$f/$n"
}

stage=$work/stage
rm -rf "$stage"
mkdir -p "$stage/fixes"
index=$stage/index.tsv
printf '# name\tfile\tchanged_lines\tlocation (vmlinux or module)\n' >"$index"

# 4. Compile every candidate with its change applied, as one object each.
# One make for all of them: kbuild's fixed cost is about 10 s per
# invocation, more than most compilations, and each object depends only on
# its own .c file (the headers stay as they are), so compiling them
# together gives what compiling each alone would; an object whose source
# includes another candidate's .c file is compiled again alone. make runs
# without -j: one compilation at a time.
saved=$work/saved applied=$work/applied.txt
restore_all() { # puts the original files back (after a crash too: next run)
	[[ -e $applied ]] || return 0
	local f
	while read -r f; do cp -a "$saved/$f" "$tree/$f"; done <"$applied"
	rm -f "$applied"
}
restore_all
trap restore_all EXIT
apply() { # files...: replace them in the tree by NEW's, remembering the originals
	local f
	for f; do
		mkdir -p "$saved/$(dirname "$f")"
		cp -a "$tree/$f" "$saved/$f"
		echo "$f" >>"$applied"
		cp "$new/$f" "$tree/$f"
	done
}
make_objs() { # log objects...: compile them, going on past failures
	local log=$1 o
	shift
	for o; do rm -f "$tree/$o"; done
	make -k -C "$tree" CC="$cc" KCFLAGS="$kcflags" "$@" >"$log" 2>&1 || true
}
first_error() { # log object: the first error kbuild printed while compiling it
	awk -v o="$2" '$1 == "CC" { sub(/^\.\//, "", $NF); on = ($NF == o); next }
		on && /error/ { sub(/^[^ ]*: /, ""); print; exit }' "$1" |
		sed "s/\xe2\x80[\x98\x99]/'/g" | cut -c1-120 # gcc's typographic quotes as '
}
objs=()
for f in "${candidates[@]}"; do
	cmp -s "$tree/$f" "$old/$f" || die "$tree/$f differs from $old_version's: the prepared tree is not that source"
	objs+=("${f%.c}.o")
done
rm -rf "$saved" "$work/logs"
mkdir -p "$saved" "$work/logs"
say "compiling ${#objs[@]} objects with their change applied (log: $work/logs/patched.log)"
apply "${candidates[@]}"
make_objs "$work/logs/patched.log" "${objs[@]}"
restore_all

# Objects that compiled with another candidate's .c included: again alone.
declare -A is_candidate=()
for f in "${candidates[@]}"; do is_candidate[$f]=1; done
for f in "${candidates[@]}"; do
	obj=${f%.c}.o
	cmdf=$tree/$(dirname "$obj")/.$(basename "$obj").cmd
	[[ -e $tree/$obj && -e $cmdf ]] || continue
	for dep in $(grep -oE '[A-Za-z0-9_./,+-]+\.c' "$cmdf" | sed 's|^\./||' | sort -u); do
		if [[ $dep != "$f" && -n ${is_candidate[$dep]:-} ]]; then
			say "$obj includes $dep, also changed: compiling it again with its own change only"
			apply "$f"
			make_objs "$work/logs/${obj//\//_}.alone.log" "$obj"
			restore_all
			break
		fi
	done
done

# Tell a change that does not compile alone from a file this configuration
# cannot compile at all: compile the failed ones unchanged.
failed=()
for o in "${objs[@]}"; do [[ -e $tree/$o ]] || failed+=("$o"); done
declare -A fails_unchanged=()
if [[ ${#failed[@]} -gt 0 ]]; then
	say "${#failed[@]} objects failed; compiling them unchanged (log: $work/logs/unchanged.log)"
	make_objs "$work/logs/unchanged.log" "${failed[@]}"
	for o in "${failed[@]}"; do
		[[ -e $tree/$o ]] || fails_unchanged[$o]=1
		rm -f "$tree/$o"
	done
fi

kept=0 nvmlinux=0 nmodules=0 i=0
for f in "${candidates[@]}"; do
	i=$((i + 1))
	name=${f%.c}
	name=${name//\//_}
	obj=${f%.c}.o
	if [[ ! -e $tree/$obj ]]; then
		if [[ -n ${fails_unchanged[$obj]:-} ]]; then
			# Most are of a disabled option; some are built, but only from
			# another directory's Makefile (amdgpu builds ../amdkfd/*.o),
			# which make DIR/NAME.o, as Stitch runs it, cannot do.
			why="fails unchanged too: make $obj fails with the original source as well (not built in this configuration, or only from another directory's Makefile)"
		else
			why="does not compile alone: $(first_error "$work/logs/patched.log" "$obj")"
		fi
		drop "$f" "$why"
		say "[$i/${#candidates[@]}] drop $f: $why"
		continue
	fi
	if ! fx=$(facts "$obj"); then
		drop "$f" "no kbuild facts: $obj's .cmd has no KBUILD_MODNAME"
		say "[$i/${#candidates[@]}] drop $f: no kbuild facts"
		continue
	fi
	read -r where rest <<<"$fx"
	if [[ $where == module ]]; then
		missing=()
		for m in $rest; do grep -qxF "$m" "$shipped" || missing+=("$m"); done
		if [[ ${#missing[@]} -gt 0 ]]; then
			drop "$f" "module not shipped: ${missing[*]} (compiled for a module the package does not ship)"
			say "[$i/${#candidates[@]}] drop $f: module ${missing[*]} not shipped"
			continue
		fi
		location=${rest// /,}
		nmodules=$((nmodules + 1))
	else
		share=$(builtin_share "$obj")
		if [[ ${share%/*} == 0 || $((${share%/*} * 2)) -lt ${share#*/} ]]; then
			drop "$f" "not built in this configuration: compiled as built-in, but only $share of its functions are in the kernel's kallsyms"
			say "[$i/${#candidates[@]}] drop $f: not in this kernel ($share functions in the kernel's kallsyms)"
			continue
		fi
		location=vmlinux
		nvmlinux=$((nvmlinux + 1))
	fi
	patch=$stage/fixes/$name.patch
	diff -u --label "a/$f" --label "b/$f" "$old/$f" "$new/$f" >"$patch" && die "$f: diff found no difference"
	# changed_lines: added and removed lines that are not blank, as 6.1's.
	lines=$(awk 'NR > 2 && /^[-+]/ { if (substr($0, 2) ~ /[^ \t]/) n++ } END { print n + 0 }' "$patch")
	printf '%s\t%s\t%s\t%s\n' "$name" "$f" "$lines" "$location" >>"$index"
	kept=$((kept + 1))
	say "[$i/${#candidates[@]}] keep $f: $location, $lines lines"
done

# 5. Install the corpus and report.
mkdir -p "$outdir"
rm -rf "$outdir/fixes"
mv "$stage/fixes" "$outdir/fixes"
mv "$index" "$outdir/index.tsv"
elapsed=$(($(date +%s) - start))
{
	echo "corpus $outdir: $pkg $old_version -> $new_version, measured on $release"
	echo "C files that differ: $total"
	awk -F'\t' '{sub(/:.*/, "", $2); n[$2]++} END {for (r in n) printf "dropped (%s): %d\n", r, n[r]}' "$dropped" | sort
	echo "candidates compiled: ${#candidates[@]}"
	echo "kept: $kept ($nvmlinux vmlinux, $nmodules modules)"
	echo "time: ${elapsed}s"
} | tee "$work/summary.txt" >&2
