#!/usr/bin/env bash
# Installs what the `halo` harness tests need (run as root on Debian 12 / Ubuntu):
#   - OpenSSH server and client (the cluster test starts its own sshd on 127.0.0.1)
#   - rsvg-convert (librsvg2-bin) for `halo bench --plot FILE.png`
#   - Ray from PyPI, in a dedicated Python virtual environment
#   - a minimal Debian 12 root filesystem (debootstrap) with Python and the same Ray inside,
#     standing in for the vLLM container in the container-runtime cluster test
#
#   scripts/setup-harness.sh           # install (idempotent; fast when already done)
#   scripts/setup-harness.sh --print   # print the venv's bin directory and exit
#
# Both live outside the work tree so they are never committed and survive fresh clones:
# $HALO_HARNESS_VENV (default ~/.cache/halo-harness/venv) and $HALO_HARNESS_ROOTFS (default
# ~/.cache/halo-harness/rootfs; built once, about 4 min, 650 MB). The tests find Ray in the
# venv (or through $HALO_RAY) and the root filesystem there.
set -euo pipefail

RAY_VERSION="2.60.0"
HARNESS_PKGS=(openssh-server openssh-client librsvg2-bin debootstrap debian-archive-keyring)
VENV="${HALO_HARNESS_VENV:-${HOME}/.cache/halo-harness/venv}"
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
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
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
        && [[ "$("$VENV/bin/python" -c 'import ray; print(ray.__version__)' 2>/dev/null)" == "$RAY_VERSION" ]]
}

if ray_ok; then
    echo "setup-harness.sh: ray $RAY_VERSION already in $VENV"
else
    python=""
    # Ray wheels exist for CPython 3.9-3.12 only.
    for cand in python3.11 python3.12 python3.10 python3.9 python3; do
        if command -v "$cand" >/dev/null \
            && "$cand" -c 'import sys, venv; sys.exit(not ((3, 9) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null; then
            python="$cand"
            break
        fi
    done
    [[ -n "$python" ]] || die "no Python 3.9-3.12 with the venv module found (apt-get install python3-venv)"
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "setup-harness.sh: creating venv $VENV with $($python --version)"
        mkdir -p "$(dirname "$VENV")"
        "$python" -m venv "$VENV" || die "could not create venv at $VENV"
    fi
    echo "setup-harness.sh: installing ray==$RAY_VERSION into $VENV"
    # Plain `ray` (no [default] extras): `ray start/status/stop` and tasks need nothing more,
    # and the dashboard is disabled by the harness anyway.
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "ray==$RAY_VERSION" \
        || die "pip install ray==$RAY_VERSION failed"
    ray_ok || die "ray $RAY_VERSION still not importable from $VENV"
fi

# --- Debian root filesystem with Ray inside ------------------------------------------
# Entered with `unshare --mount … chroot ROOT` (the cluster test's `engine = "command"`), so
# `ray` exists inside it and not on the host. Debian 12's Python is 3.11, so the wheels are
# fetched by the host's pip for CPython 3.11 (whatever Python the venv has) and installed
# inside without network access.
rootfs_stamp="ray $RAY_VERSION, python3.11"
if [[ -f "$ROOTFS/.halo-rootfs" && "$(cat "$ROOTFS/.halo-rootfs")" == "$rootfs_stamp" ]]; then
    echo "setup-harness.sh: root filesystem with $rootfs_stamp already in $ROOTFS"
else
    [[ $EUID -eq 0 ]] || die "building the root filesystem $ROOTFS needs root"
    build="$ROOTFS.building"
    rm -rf "$build"
    mkdir -p "$(dirname "$ROOTFS")"
    t0=$(date +%s)
    echo "setup-harness.sh: debootstrap bookworm (minbase, python3) into $build"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$build" "$DEBIAN_MIRROR" \
        >"$build.log" 2>&1 || die "debootstrap failed (log: $build.log)"
    echo "setup-harness.sh: debootstrap took $(($(date +%s) - t0)) s"
    mkdir -p "$build/tmp/wheels"
    arch=$(uname -m)
    "$VENV/bin/python" -m pip download --disable-pip-version-check -q --dest "$build/tmp/wheels" \
        --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux_2_28_$arch" \
        "ray==$RAY_VERSION" || die "pip download ray==$RAY_VERSION failed"
    unshare --mount --propagation private -- sh -c '
        set -e
        mount -t proc proc "$1/proc"
        mount --rbind /dev "$1/dev"
        exec chroot "$1" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root sh -c "
            python3 -m venv /opt/ray &&
            /opt/ray/bin/pip install --disable-pip-version-check -q --no-index --find-links /tmp/wheels ray==$2 &&
            ln -sf /opt/ray/bin/ray /usr/local/bin/ray &&
            ray --version"' sh "$build" "$RAY_VERSION" \
        || die "installing ray inside $build failed"
    rm -rf "$build/tmp/wheels" "$build.log"
    echo "$rootfs_stamp" >"$build/.halo-rootfs"
    rm -rf "$ROOTFS"
    mv "$build" "$ROOTFS"
    echo "setup-harness.sh: root filesystem ready in $ROOTFS ($(($(date +%s) - t0)) s)"
fi

echo "setup-harness.sh: ready in $(($(date +%s) - start)) s; ray: $VENV/bin/ray; root filesystem: $ROOTFS"
