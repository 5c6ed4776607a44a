#!/usr/bin/env bash
# Builds the plugin (release) and installs it as librccl-net-halo.so.
#
#   scripts/install-plugin.sh [--prefix DIR] [--links]
#
#   --prefix DIR  where to install (default /usr/local/lib)
#   --links       also create librccl-net.so and libnccl-net.so links, the names RCCL loads
#                 when NCCL_NET_PLUGIN is unset (ROCm 7.1/7.2 look for libnccl-net.so)
#
# Then run RCCL with NCCL_NET_PLUGIN=halo (the directory on the loader path) or
# NCCL_NET_PLUGIN=<prefix>/librccl-net-halo.so.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=/usr/local/lib
links=0
while (($#)); do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --links) links=1; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install-plugin.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
    esac
done
cargo build --release -p rccl-net-plugin
mkdir -p "$prefix"
install -m 0755 target/release/librccl_net_plugin.so "$prefix/librccl-net-halo.so"
echo "installed $prefix/librccl-net-halo.so"
if ((links)); then
    ln -sf librccl-net-halo.so "$prefix/librccl-net.so"
    ln -sf librccl-net-halo.so "$prefix/libnccl-net.so"
    echo "linked $prefix/librccl-net.so and $prefix/libnccl-net.so"
fi
