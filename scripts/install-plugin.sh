#!/usr/bin/env bash
# Builds the plugin (release) and installs it as librccl-net-halo.so.
#
#   scripts/install-plugin.sh [--prefix DIR] [--links] [--ldconfig]
#
#   --prefix DIR  where to install (default /usr/local/lib)
#   --links       also create librccl-net.so and libnccl-net.so links, the names RCCL loads
#                 when NCCL_NET_PLUGIN is unset (ROCm 7.1/7.2 look for libnccl-net.so)
#   --ldconfig    add DIR to the loader cache (/etc/ld.so.conf.d/halo.conf), so that no
#                 LD_LIBRARY_PATH is needed
#
# Then run RCCL with NCCL_NET_PLUGIN=halo and DIR on LD_LIBRARY_PATH (or in the loader cache):
# every RCCL resolves that to librccl-net-halo.so by name. A full path in NCCL_NET_PLUGIN is
# ignored by RCCL of ROCm 6.1 and 6.2, which fall back to their own transports without a word.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=/usr/local/lib
links=0
ldconfig=0
while (($#)); do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --links) links=1; shift ;;
        --ldconfig) ldconfig=1; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
if ((ldconfig)); then
    echo "$prefix" >/etc/ld.so.conf.d/halo.conf
    ldconfig
    echo "added $prefix to the loader cache; run RCCL with: export NCCL_NET_PLUGIN=halo"
else
    echo "run RCCL with: export NCCL_NET_PLUGIN=halo LD_LIBRARY_PATH=$prefix\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
fi
