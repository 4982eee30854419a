#!/bin/bash
# Set up runv-py on a fresh Debian 12 machine (as root), then run the demo or the tests.
#
#   bash setup.sh --demo          install everything, run a container in a VM
#   bash setup.sh --test [ARGS]   install everything, run the test suite (pytest ARGS)
#   bash setup.sh                 install everything only
#
# Installs the Debian packages, the Python package (editable, with its test and compare
# extras: pytest, matplotlib),
# builds the guest kernel (cached in /var/cache/runv-py, about 10 minutes the first time)
# and the initrd, and installs both in /var/lib/runv-py.
set -euo pipefail
cd "$(dirname "$0")"

PACKAGES="qemu-system-x86 busybox-static cpio linux-source-6.1 bc bison flex libelf-dev
libssl-dev build-essential python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
runc containerd libseccomp2 podman buildah docker.io containernetworking-plugins iproute2
procps iptables catatonit criu"
PYTHON="${PYTHON:-python3}"

missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "==> installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends $missing
fi

# The unprivileged user jailed QEMUs run as (runv_py/host/jail.py; made on first use too).
id runv-py-vm >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin runv-py-vm

echo "==> installing the runv-py Python package"
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test,compare]'
# The runv-py command as the fast launcher: pip's console script cannot pass -S, and the
# commands tools poll (state, kill, ...) would pay site-packages' start-up at every call.
SCRIPT="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/runv-py"
cat > "$SCRIPT" <<EOF
#!/bin/sh
# Written by runv-py's setup.sh: python -S and runv_py/cli/launch.py (see its docstring).
exec "$("$PYTHON" -c 'import sys; print(sys.executable)')" -S "$PWD/runv_py/cli/launch.py" "\$@"
EOF
# The same for containerd's shim v2, whose `start` containerd runs at every pod's start.
cat > "$(dirname "$SCRIPT")/containerd-shim-runvpy-v2" <<EOF
#!/bin/sh
# Written by runv-py's setup.sh: python -S and runv_py/shimv2/launch.py (see its docstring).
exec "$("$PYTHON" -c 'import sys; print(sys.executable)')" -S "$PWD/runv_py/shimv2/launch.py" "\$@"
EOF
chmod +x "$SCRIPT" "$(dirname "$SCRIPT")/containerd-shim-runvpy-v2"

# A cgroup v1 (hybrid) host whose image mounted only some controllers: mount the rest as
# systemd does, so a container's net_cls, net_prio and hugetlb values have somewhere to go
# (runv-py refuses a value for a controller no hierarchy has, as runc does).
if [ -d /sys/fs/cgroup/memory ] && [ ! -f /sys/fs/cgroup/cgroup.controllers ]; then
    for group in net_cls,net_prio hugetlb perf_event; do
        mounted=" $(grep ' - cgroup ' /proc/self/mountinfo | awk '{print $NF}' | tr , ' ' | tr '\n' ' ' || true) "
        [[ "$mounted" == *" ${group%%,*} "* ]] && continue
        grep -qw "^${group%%,*}" /proc/cgroups || continue
        echo "==> mounting the cgroup v1 hierarchy $group"
        mkdir -p "/sys/fs/cgroup/$group"
        mount -t cgroup -o "$group" cgroup "/sys/fs/cgroup/$group"
        for name in ${group//,/ }; do
            [ -e "/sys/fs/cgroup/$name" ] || ln -s "$group" "/sys/fs/cgroup/$name"
        done
    done
fi

LIB_DIR=/var/lib/runv-py                      # == runv_py/paths.py
export RUNV_CACHE="${RUNV_CACHE:-/var/cache/runv-py}"
bash kernel/build.sh "$LIB_DIR/kernel"
"$PYTHON" -m runv_py.hyperstart.initrd --output "$LIB_DIR/initrd.img" --cache "$RUNV_CACHE"

case "${1:-}" in
--demo)
    bundle="$(mktemp -d /tmp/runv-demo.XXXXXX)"
    runv-py make-bundle "$bundle" -- sh -c \
        'echo "hello from a container in a VM"; echo "guest kernel: $(uname -r), host name: $(hostname)"; cat /proc/cpuinfo | grep -m1 "model name"' >/dev/null
    echo "==> runv-py run -b $bundle demo"
    status=0
    runv-py run -b "$bundle" "demo-$$" || status=$?
    rm -rf "$bundle"
    exit $status
    ;;
--test)
    shift
    echo "==> running the tests"
    exec "$PYTHON" -m pytest -v -p no:cacheprovider "$@" tests
    ;;
esac
