#!/usr/bin/env bash
# Installs what Stitch's demo and tests need on Debian 12 (run as root).
# Every package comes from Debian's archive; see ../shared/kernels.md for
# why these exact versions.
set -euo pipefail

release=6.1.0-54-amd64
source_version=6.1.190-1
cache=${STITCH_CACHE:-/var/cache/stitch}

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
	qemu-system-x86 \
	"linux-image-$release" "linux-headers-$release" \
	gcc-12 make bc flex bison libelf-dev libssl-dev dwarves xz-utils cpio kmod patch \
	ca-certificates git \
	ovmf efitools sbsigntool openssl \
	chromium

# The running kernel's exact source, for building objects that match it.
# A plain 'apt-get install linux-source-6.1' would give the newest version.
mkdir -p "$cache/debs"
deb="$cache/debs/linux-source-6.1_${source_version}_all.deb"
if [ ! -s "$deb" ]; then
	(cd "$cache/debs" && apt-get download -q "linux-source-6.1=$source_version")
fi
echo "install-deps: done (kernel $release, source $deb)"
