#!/usr/bin/env bash
# Installs the system packages halo-rdma needs on Debian 12 / Ubuntu (run as root).
#
#   scripts/setup.sh               # everything
#   scripts/setup.sh --build-only  # toolchain for building the workspace
#   scripts/setup.sh --guest-only  # what scripts/softroce needs to boot Soft-RoCE guests
#
# Idempotent: packages already installed are skipped (checked with dpkg-query), so a
# second run does no network access. `apt-get update` runs at most once, and only
# when something is missing.
set -euo pipefail

# --- package groups ------------------------------------------------------------
# Add new needs to the group that uses them (or add a group and wire it in below).

# Building the workspace (bindgen needs libclang). libibverbs-dev is deliberately
# absent: libibverbs is loaded at run time, never linked.
BUILD_PKGS=(
    build-essential
    cmake
    clang
    libclang-dev
    pkg-config
)

# Soft-RoCE QEMU guests (scripts/softroce): emulator, initramfs tools, RDMA user space.
GUEST_PKGS=(
    qemu-system-x86
    busybox-static
    kmod
    cpio
    rdma-core
    ibverbs-providers
    ibverbs-utils
    perftest
    iproute2
    python3
    xz-utils
    zstd
)

# --- options -------------------------------------------------------------------
want_build=1
want_guest=1
for arg in "$@"; do
    case "$arg" in
        --build-only) want_guest=0 ;;
        --guest-only) want_build=0 ;;
        -h|--help)
            awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
            exit 0
            ;;
        *)
            echo "setup.sh: unknown option '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

die() {
    echo "setup.sh: error: $*" >&2
    exit 1
}

wanted=()
((want_build)) && wanted+=("${BUILD_PKGS[@]}")
((want_guest)) && wanted+=("${GUEST_PKGS[@]}")
((${#wanted[@]})) || die "--build-only and --guest-only together select nothing"

installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == "installed" ]]
}

missing=()
for pkg in "${wanted[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    echo "setup.sh: all ${#wanted[@]} packages already installed"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "missing packages (${missing[*]}); run as root to install them"
command -v apt-get >/dev/null || die "apt-get not found: only Debian/Ubuntu are supported"

export DEBIAN_FRONTEND=noninteractive
# Another apt/dpkg run (e.g. a concurrent setup) holds the lock: wait for it, bounded.
apt_opts=(-o DPkg::Lock::Timeout=600)

echo "setup.sh: installing: ${missing[*]}"
apt-get "${apt_opts[@]}" update -qq || die "apt-get update failed"
apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}" \
    || die "apt-get install failed for: ${missing[*]}"

still=()
for pkg in "${missing[@]}"; do
    installed "$pkg" || still+=("$pkg")
done
((${#still[@]} == 0)) || die "still not installed after apt-get: ${still[*]}"
echo "setup.sh: installed ${#missing[@]} package(s)"
