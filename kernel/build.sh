#!/bin/bash
# Build the runv-py guest kernel from Debian's linux-source-6.1 and install it.
#
# The result is cached outside the repo in $RUNV_CACHE (default /var/cache/runv-py),
# keyed by the config fragment, this script, the kernel source package version and the
# compiler, so a second run with the same inputs only re-installs the cached vmlinux.
#
# usage: kernel/build.sh [DEST]   (default DEST: /var/lib/runv-py/kernel)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-/var/lib/runv-py/kernel}"
cache="${RUNV_CACHE:-/var/cache/runv-py}"
tarball=/usr/src/linux-source-6.1.tar.xz

[ -f "$tarball" ] || { echo "kernel/build.sh: $tarball missing: apt-get install linux-source-6.1" >&2; exit 1; }

src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
key="$( { cat "$here/guest.config" "$here/build.sh"; echo "$src_version"; gcc --version | head -1; } | sha256sum | cut -c1-16)"
out="$cache/kernel-$key"

if [ ! -f "$out/vmlinux" ]; then
    echo "==> building guest kernel $key (linux-source $src_version); about 10 minutes on 2 cores"
    work="$cache/build-$key"
    rm -rf "$work" && mkdir -p "$work"
    echo "==> unpacking $tarball"
    tar -C "$work" -xf "$tarball"
    cd "$work"/linux-source-6.1
    make -s allnoconfig
    scripts/kconfig/merge_config.sh -m .config "$here/guest.config" >/dev/null
    make -s olddefconfig
    # Every option the fragment asks for must survive olddefconfig.
    missing=0
    while IFS= read -r line; do
        case "$line" in CONFIG_*=n) opt="# ${line%=n} is not set" ;; CONFIG_*) opt="$line" ;; *) continue ;; esac
        grep -qxF "$opt" .config || { echo "kernel/build.sh: option not applied: $line" >&2; missing=1; }
    done < "$here/guest.config"
    [ "$missing" = 0 ] || exit 1
    echo "==> compiling vmlinux with $(nproc) jobs (progress: one dot per 200 objects)"
    make -j"$(nproc)" vmlinux 2>&1 | awk '/^  CC/ { n++; if (n % 200 == 0) { printf "."; fflush() } } /error|Error/ { print }'
    echo
    [ -f vmlinux ] || { echo "kernel/build.sh: build failed" >&2; exit 1; }
    mkdir -p "$out.tmp"
    cp vmlinux "$out.tmp/vmlinux"
    cp .config "$out.tmp/config"
    make -s kernelrelease > "$out.tmp/release"
    rm -rf "$out" && mv "$out.tmp" "$out"
    cd / && rm -rf "$work"
fi

mkdir -p "$(dirname "$dest")"
install -m 0644 "$out/vmlinux" "$dest.tmp" && mv "$dest.tmp" "$dest"
echo "==> guest kernel $(cat "$out/release") installed at $dest"
