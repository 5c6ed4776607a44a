#!/usr/bin/env bash
# Installs what the `halo` harness tests need (run as root on Debian 12 / Ubuntu):
#   - OpenSSH server and client (the cluster test starts its own sshd on 127.0.0.1)
#   - rsvg-convert (librsvg2-bin) for `halo bench --plot FILE.png`
#   - Debian's python3-torch (a CPU build; `halo bench --collective` runs it with gloo)
#   - Ray from PyPI, in a virtual environment of the system python that sees its packages
#   - a minimal Debian 12 root filesystem (debootstrap) with Python, python3-torch and the same
#     Ray inside, standing in for the vLLM container in the container-runtime cluster test
#     (cluster up/status/down and the collective ranks)
#
#   scripts/setup-harness.sh           # install (idempotent; fast when already done)
#   scripts/setup-harness.sh --print   # print the venv's bin directory and exit
#
# Both live outside the work tree so they are never committed and survive fresh clones:
# $HALO_HARNESS_VENV (default ~/.cache/halo-harness/venv-system) and $HALO_HARNESS_ROOTFS
# (default ~/.cache/halo-harness/rootfs; built once, about 6 min, 1.6 GB, most of it torch's
# Debian dependencies). The tests find Ray in the venv (or through $HALO_RAY) and the root
# filesystem there. The venv is made from
# /usr/bin/python3 with --system-site-packages so that Ray's workers import Debian's torch
# (never PyPI's torch wheel, which pulls gigabytes of CUDA libraries).
set -euo pipefail

RAY_VERSION="2.60.0"
HARNESS_PKGS=(openssh-server openssh-client librsvg2-bin python3-venv python3-torch debootstrap debian-archive-keyring)
VENV="${HALO_HARNESS_VENV:-${HOME}/.cache/halo-harness/venv-system}"
SYSTEM_PYTHON=/usr/bin/python3
ROOTFS="${HALO_HARNESS_ROOTFS:-${HOME}/.cache/halo-harness/rootfs}"
DEBIAN_MIRROR="${HALO_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

die() {
    echo "setup-harness.sh: error: $*" >&2
    exit 1
}

case "${1:-}" in
    "") ;;
    --print)
        echo "$VENV/bin"
        exit 0
        ;;
    -h|--help)
        sed -n '2,/^set -e/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "setup-harness.sh: unknown option '$1' (try --help)" >&2
        exit 2
        ;;
esac

start=$(date +%s)

# --- OpenSSH ---------------------------------------------------------------------
installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == "installed" ]]
}
missing=()
for pkg in "${HARNESS_PKGS[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] || die "missing packages (${missing[*]}); run as root to install them"
    command -v apt-get >/dev/null || die "apt-get not found: only Debian/Ubuntu are supported"
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-o DPkg::Lock::Timeout=600)
    echo "setup-harness.sh: installing: ${missing[*]}"
    apt-get "${apt_opts[@]}" update -qq || die "apt-get update failed"
    apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
else
    echo "setup-harness.sh: ${HARNESS_PKGS[*]} already installed"
fi
[[ -x /usr/sbin/sshd ]] || die "/usr/sbin/sshd missing after install"

# --- Ray in a venv ---------------------------------------------------------------
ray_ok() {
    [[ -x "$VENV/bin/ray" ]] \
        && [[ "$("$VENV/bin/python" -c 'import ray, torch.distributed as d; assert d.is_gloo_available(); print(ray.__version__)' 2>/dev/null)" == "$RAY_VERSION" ]]
}

if ray_ok; then
    echo "setup-harness.sh: ray $RAY_VERSION already in $VENV"
else
    python="$SYSTEM_PYTHON"
    # Ray wheels exist for CPython 3.9-3.12; Debian's torch is built for the system python.
    "$python" -c 'import sys, venv; sys.exit(not ((3, 9) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null \
        || die "$python is not a Python 3.9-3.12 with the venv module (apt-get install python3-venv)"
    "$python" -c 'import torch.distributed' 2>/dev/null || die "$python cannot import torch (apt-get install python3-torch)"
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "setup-harness.sh: creating venv $VENV with $($python --version) and its system packages"
        mkdir -p "$(dirname "$VENV")"
        "$python" -m venv --system-site-packages "$VENV" || die "could not create venv at $VENV"
    fi
    echo "setup-harness.sh: installing ray==$RAY_VERSION into $VENV"
    # Plain `ray` (no [default] extras): `ray start/status/stop` and tasks need nothing more,
    # and the dashboard is disabled by the harness anyway.
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "ray==$RAY_VERSION" \
        || die "pip install ray==$RAY_VERSION failed"
    ray_ok || die "ray $RAY_VERSION and torch still not importable from $VENV"
fi

# --- Debian root filesystem with Ray and torch inside ---------------------------------
# Entered with `unshare --mount … chroot ROOT` (the cluster test's `engine = "command"`), so
# `ray` exists inside it and not on the host; `halo bench --collective` runs its ranks there.
# Debian 12's Python is 3.11, so the Ray wheels are fetched by the host's pip for CPython 3.11
# (whatever Python the venv has) and installed inside without network access. Debian's
# python3-torch (CPU) is installed by apt inside, and /opt/ray sees it (system site packages),
# so Ray's workers there import torch.
# Two stamps: .halo-rootfs (Debian, Python, Ray: a change rebuilds the tree) and
# .halo-rootfs-torch (torch for the ranks). A tree from before torch gets it added in place,
# once, and keeps its first stamp, so an older copy of this script (another checkout on the
# same machine) still takes the tree as its own instead of rebuilding it without torch.
rootfs_stamp="ray $RAY_VERSION, python3.11"
torch_stamp="python3-torch, /opt/ray with system site packages"

# Runs $2 with sh inside the tree $1, with /proc and /dev, in a private mount namespace.
in_rootfs() {
    unshare --mount --propagation private -- sh -c '
        set -e
        mount -t proc proc "$1/proc"
        mount --rbind /dev "$1/dev"
        exec chroot "$1" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME=/root DEBIAN_FRONTEND=noninteractive sh -c "$2"' sh "$1" "$2"
}

# Debian's python3-torch into the tree $1, visible to its /opt/ray; apt's output goes to $2.
add_torch() {
    local t1
    t1=$(date +%s)
    echo "setup-harness.sh: apt-get install python3-torch inside $1 (log: $2)"
    cp /etc/resolv.conf "$1/etc/resolv.conf"
    in_rootfs "$1" "
        set -e
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends python3-torch
        apt-get clean
        rm -rf /var/lib/apt/lists/*" >>"$2" 2>&1 \
        || die "installing python3-torch inside $1 failed (log: $2)"
    # What `python3 -m venv --system-site-packages` writes; Ray's own packages still come first.
    sed -i 's/^include-system-site-packages = false$/include-system-site-packages = true/' "$1/opt/ray/pyvenv.cfg"
    in_rootfs "$1" "/opt/ray/bin/python -c 'import ray, torch, torch.distributed as d; assert d.is_gloo_available(); print(\"setup-harness.sh: /opt/ray imports ray\", ray.__version__, \"and torch\", torch.__version__, \"from\", torch.__file__)'" \
        || die "/opt/ray/bin/python inside $1 cannot import ray and torch with gloo (log: $2)"
    echo "$torch_stamp" >"$1/.halo-rootfs-torch"
    rm -f "$2"
    echo "setup-harness.sh: python3-torch took $(($(date +%s) - t1)) s"
}

# Processes whose root directory is $1 (a cluster test running in it).
rootfs_users() {
    local d pids=() want
    want=$(readlink -f "$1")
    for d in /proc/[0-9]*; do
        [[ "$(readlink "$d/root" 2>/dev/null)" == "$want" ]] && pids+=("${d#/proc/}")
    done
    echo "${pids[*]}"
}

stamp_is() {
    [[ -f "$1" && "$(cat "$1")" == "$2" ]]
}

if stamp_is "$ROOTFS/.halo-rootfs" "$rootfs_stamp" && stamp_is "$ROOTFS/.halo-rootfs-torch" "$torch_stamp"; then
    echo "setup-harness.sh: root filesystem with $rootfs_stamp, $torch_stamp already in $ROOTFS"
else
    [[ $EUID -eq 0 ]] || die "building the root filesystem $ROOTFS needs root"
    mkdir -p "$(dirname "$ROOTFS")"
    # One build at a time (several checkouts share the tree).
    exec 9>>"$ROOTFS.lock"
    if ! flock -n 9; then
        echo "setup-harness.sh: another setup-harness.sh is building $ROOTFS: waiting for it"
        flock 9
    fi
fi
# Old trees moved aside while something still ran in them (see below).
for old in "$ROOTFS".old.*; do
    [[ -d "$old" && -z "$(rootfs_users "$old")" ]] || continue
    echo "setup-harness.sh: removing the replaced root filesystem $old"
    rm -rf "$old"
done
if stamp_is "$ROOTFS/.halo-rootfs" "$rootfs_stamp"; then
    if ! stamp_is "$ROOTFS/.halo-rootfs-torch" "$torch_stamp"; then
        echo "setup-harness.sh: adding python3-torch to $ROOTFS (made before the collective ranks ran inside)"
        add_torch "$ROOTFS" "$ROOTFS.torch.log"
        echo "setup-harness.sh: root filesystem ready in $ROOTFS ($(du -sh "$ROOTFS" | cut -f1))"
    fi
else
    if [[ -f "$ROOTFS/.halo-rootfs" ]]; then
        echo "setup-harness.sh: rebuilding $ROOTFS (it has: $(cat "$ROOTFS/.halo-rootfs"); wanted: $rootfs_stamp)"
    fi
    build="$ROOTFS.building"
    rm -rf "$build"
    t0=$(date +%s)
    echo "setup-harness.sh: debootstrap bookworm (minbase, python3) into $build"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$build" "$DEBIAN_MIRROR" \
        >"$build.log" 2>&1 || die "debootstrap failed (log: $build.log)"
    echo "setup-harness.sh: debootstrap took $(($(date +%s) - t0)) s"
    t1=$(date +%s)
    echo "setup-harness.sh: ray $RAY_VERSION into /opt/ray inside"
    mkdir -p "$build/tmp/wheels"
    arch=$(uname -m)
    "$VENV/bin/python" -m pip download --disable-pip-version-check -q --dest "$build/tmp/wheels" \
        --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux_2_28_$arch" \
        "ray==$RAY_VERSION" || die "pip download ray==$RAY_VERSION failed"
    in_rootfs "$build" "
        set -e
        python3 -m venv --system-site-packages /opt/ray
        /opt/ray/bin/pip install --disable-pip-version-check -q --no-index --find-links /tmp/wheels ray==$RAY_VERSION
        ln -sf /opt/ray/bin/ray /usr/local/bin/ray
        ray --version" \
        || die "installing ray inside $build failed"
    rm -rf "$build/tmp/wheels"
    echo "setup-harness.sh: ray took $(($(date +%s) - t1)) s"
    add_torch "$build" "$build.log"
    echo "$rootfs_stamp" >"$build/.halo-rootfs"
    if [[ -e "$ROOTFS" ]]; then
        # A test still running in the old tree keeps it (moved aside) until a later run.
        users=$(rootfs_users "$ROOTFS")
        if [[ -n "$users" ]]; then
            old="$ROOTFS.old.$(date +%s)"
            echo "setup-harness.sh: processes $users still run in $ROOTFS: moving it to $old (removed by a later run)"
            mv "$ROOTFS" "$old"
        else
            rm -rf "$ROOTFS"
        fi
    fi
    mv "$build" "$ROOTFS"
    echo "setup-harness.sh: root filesystem ready in $ROOTFS ($(($(date +%s) - t0)) s, $(du -sh "$ROOTFS" | cut -f1))"
fi

echo "setup-harness.sh: ready in $(($(date +%s) - start)) s; ray: $VENV/bin/ray; root filesystem: $ROOTFS"
