#!/usr/bin/env bash
# Compares halo with other net plugins (NCCL's IB transport from nccl-rdma-sharp-plugins, and
# aws-ofi-nccl) on one Soft-RoCE device: netbench --compare in alternated rounds, with perftest on
# the same device once per round. Run it as root in a Soft-RoCE guest:
#
#   scripts/softroce run --timeout 3000 -- scripts/compare-peers.sh \
#       --halo target/release/librccl_net_plugin.so --nccl-ib PATH/nccl-ib.so --ofi PATH/ofi.so [netbench args]
#
# Any of --halo, --nccl-ib and --ofi may be left out (at least one is needed). Other arguments go to
# netbench (e.g. --quick, --rounds 3, --latency, --json); --netbench PATH picks the program
# (default target/release/examples/netbench of this checkout); --no-perftest leaves perftest out.
#
# Setup (idempotent): a dummy netdev dummy0 with 10.77.0.1/24 and MTU 9000, and the Soft-RoCE device
# rxe1 on it. libfabric's verbs provider ignores an rxe device on `lo` and aws-ofi-nccl wants a
# non-loopback IPv4 interface, so every plugin and perftest run on rxe1 for a like-for-like table.
# Environment per plugin (both ends of each run get it):
#   halo     NCCL_IB_HCA=rxe1
#   nccl-ib  NCCL_IB_HCA=rxe1
#   ofi      FI_PROVIDER='verbs;ofi_rxm' FI_VERBS_IFACE=dummy0 FI_UNIVERSE_SIZE=64
#            (without FI_UNIVERSE_SIZE, ofi_rxm asks for a verbs CQ larger than rxe allows)
# perftest uses rxe1's RoCE v2 GID of 10.77.0.1, found in sysfs.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NETBENCH=$ROOT/target/release/examples/netbench
IFACE=dummy0
ADDR=10.77.0.1
DEV=rxe1
HALO="" NCCLIB="" OFI="" PERFTEST=1
ARGS=()

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --halo) HALO=${2:?--halo needs a path}; shift 2 ;;
        --nccl-ib) NCCLIB=${2:?--nccl-ib needs a path}; shift 2 ;;
        --ofi) OFI=${2:?--ofi needs a path}; shift 2 ;;
        --netbench) NETBENCH=${2:?--netbench needs a path}; shift 2 ;;
        --no-perftest) PERFTEST=0; shift ;;
        -h|--help) usage 0 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
[ -n "$HALO$NCCLIB$OFI" ] || { echo "compare-peers: give at least one of --halo, --nccl-ib, --ofi" >&2; usage; }
for f in "$NETBENCH" "$HALO" "$NCCLIB" "$OFI"; do
    [ -z "$f" ] || [ -e "$f" ] || { echo "compare-peers: $f does not exist" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "compare-peers: needs root (run it in a Soft-RoCE guest)" >&2; exit 2; }

# ---- dummy0 + rxe1 (idempotent) ----
ip link show "$IFACE" >/dev/null 2>&1 || ip link add "$IFACE" type dummy
ip -4 addr show dev "$IFACE" | grep -q "inet $ADDR/" || ip addr add "$ADDR/24" dev "$IFACE"
ip link set "$IFACE" mtu 9000 up
[ -e "/sys/class/infiniband/$DEV" ] || rdma link add "$DEV" type rxe netdev "$IFACE"

# ---- rxe1's RoCE v2 GID index of $ADDR (::ffff:a.b.c.d); the GID table fills in asynchronously ----
want=$(printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' ${ADDR//./ })
port=/sys/class/infiniband/$DEV/ports/1
gid_index=""
for _ in $(seq 50); do
    for t in "$port"/gid_attrs/types/*; do
        i=${t##*/}
        [ "$(cat "$t" 2>/dev/null)" = "RoCE v2" ] || continue
        [ "$(cat "$port/gids/$i" 2>/dev/null)" = "$want" ] && { gid_index=$i; break 2; }
    done
    sleep 0.1
done
[ -n "$gid_index" ] || { echo "compare-peers: no RoCE v2 GID for $ADDR on $DEV" >&2; exit 1; }
echo "compare-peers: $DEV on $IFACE ($ADDR), RoCE v2 GID index $gid_index" >&2

# ---- the comparison ----
list="" envs=()
if [ -n "$HALO" ]; then list+=",halo=$HALO"; envs+=(--env "halo:NCCL_IB_HCA=$DEV"); fi
if [ -n "$NCCLIB" ]; then list+=",nccl-ib=$NCCLIB"; envs+=(--env "nccl-ib:NCCL_IB_HCA=$DEV"); fi
if [ -n "$OFI" ]; then
    list+=",ofi=$OFI"
    envs+=(--env "ofi:FI_PROVIDER=verbs;ofi_rxm" --env "ofi:FI_VERBS_IFACE=$IFACE" --env "ofi:FI_UNIVERSE_SIZE=64")
fi
pt=()
[ "$PERFTEST" = 1 ] && pt=(--compare-perftest --ibdev "$DEV" --gid-index "$gid_index")
# In a guest, the comparison so far is kept on the host after every run (see softroce --share).
save=()
[ -n "${HALO_GUEST_SHARE:-}" ] && save=(--save "$HALO_GUEST_SHARE/compare.json")
set -x
exec "$NETBENCH" --compare "${list#,}" "${envs[@]}" "${pt[@]}" "${save[@]}" "${ARGS[@]}"
