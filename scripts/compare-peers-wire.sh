#!/usr/bin/env bash
# Compares halo with other net plugins across a real RoCE v2 wire: two Soft-RoCE guests (two
# kernels) joined by a link, as `scripts/softroce run2` boots them. Both guests run this script
# with the same arguments; guest a serves, guest b drives:
#
#   scripts/softroce run2 --cpus 1 --pin --timeout 3500 -- scripts/compare-peers-wire.sh ARGS -- scripts/compare-peers-wire.sh ARGS
#   ARGS: --halo target/release/librccl_net_plugin.so --nccl-ib PATH/nccl-ib.so --ofi PATH/ofi.so [netbench args]
#
# Any of --halo, --nccl-ib and --ofi may be left out (at least one is needed). --extra 'NAME PATH
# [VAR=VALUE...]' (repeatable) adds a plugin, or the same plugin with other settings (e.g.
# --extra "halo-eager target/release/librccl_net_plugin.so NCCL_IB_HCA=rxe0 HALO_EAGER_MAX=8192"). Other arguments go to
# netbench on guest b (e.g. --quick, --rounds 3, --latency, --json); --netbench PATH picks the
# program (default target/release/examples/netbench of this checkout). Per round and plugin, guest a
# starts `netbench --plugin P --server` and guest b's `netbench --compare … --connect` drives it, in
# the same order (turned by one plugin each round; packets per message are counted on b's rxe0);
# then perftest runs across the wire once per round (ib_write_lat 8 B and 4 KiB, ib_write_bw
# 1 MiB), guest a serving.
# Environment per plugin (both guests): halo and nccl-ib NCCL_IB_HCA=rxe0; ofi
# FI_PROVIDER='verbs;ofi_rxm' FI_VERBS_IFACE=eth0 FI_UNIVERSE_SIZE=64.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NETBENCH=$ROOT/target/release/examples/netbench
DEV=rxe0 IFACE=eth0 PORT=18800
HALO="" NCCLIB="" OFI="" ROUNDS=2
ARGS=() EXTRA=()

usage() { sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --halo) HALO=${2:?--halo needs a path}; shift 2 ;;
        --nccl-ib) NCCLIB=${2:?--nccl-ib needs a path}; shift 2 ;;
        --ofi) OFI=${2:?--ofi needs a path}; shift 2 ;;
        --extra) EXTRA+=("${2:?--extra needs 'NAME PATH [VAR=VALUE...]'}"); shift 2 ;;
        --netbench) NETBENCH=${2:?--netbench needs a path}; shift 2 ;;
        --rounds) ROUNDS=${2:?--rounds needs a number}; ARGS+=(--rounds "$2"); shift 2 ;;
        -h|--help) usage 0 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
[ -n "$HALO$NCCLIB$OFI${EXTRA[*]}" ] || { echo "compare-peers-wire: give at least one of --halo, --nccl-ib, --ofi, --extra" >&2; usage; }
extra_paths=()
for e in "${EXTRA[@]}"; do
    read -r _ path _ <<<"$e"
    [ -n "$path" ] || { echo "compare-peers-wire: --extra '$e': expected 'NAME PATH [VAR=VALUE...]'" >&2; exit 2; }
    extra_paths+=("$path")
done
for f in "$NETBENCH" "$HALO" "$NCCLIB" "$OFI" "${extra_paths[@]}"; do
    [ -z "$f" ] || [ -e "$f" ] || { echo "compare-peers-wire: $f does not exist" >&2; exit 2; }
done
: "${HALO_GUEST_ROLE:?run this in two guests: scripts/softroce run2 (see --help)}"
: "${HALO_GUEST_IP:?}" "${HALO_PEER_IP:?}" "${HALO_RDMA_GID_INDEX:?}"
GID=$HALO_RDMA_GID_INDEX

# The plugins in order, each as NAME PATH ENV... (one line each).
plugins=()
[ -n "$HALO" ] && plugins+=("halo $HALO NCCL_IB_HCA=$DEV")
[ -n "$NCCLIB" ] && plugins+=("nccl-ib $NCCLIB NCCL_IB_HCA=$DEV")
[ -n "$OFI" ] && plugins+=("ofi $OFI FI_PROVIDER=verbs;ofi_rxm FI_VERBS_IFACE=$IFACE FI_UNIVERSE_SIZE=64")
plugins+=("${EXTRA[@]}")

# perftest across the wire: guest a serves, guest b connects (retrying until a's server is up).
perftest() {
    local tool=$1; shift
    if [ "$HALO_GUEST_ROLE" = a ]; then
        timeout 300 "$tool" -d "$DEV" -x "$GID" -F "$@" >/dev/null
    else
        for _ in $(seq 100); do
            if out=$(timeout 300 "$tool" -d "$DEV" -x "$GID" -F "$@" "$HALO_PEER_IP" 2>&1); then
                echo "$out" | awk -v t="$tool $*" '/^ *[0-9]+ +[0-9]+/ {print "perftest " t ": " $0}'
                return 0
            fi
            sleep 0.3
        done
        echo "perftest $tool $*: the server on $HALO_PEER_IP never answered" >&2
        return 1
    fi
}

if [ "$HALO_GUEST_ROLE" = a ]; then
    n=${#plugins[@]}
    for round in $(seq "$ROUNDS"); do
        # netbench --compare turns the order by one plugin each round (A B C, B C A, C A B, …);
        # the servers follow it. A server out of turn is refused by name on b's side.
        for k in $(seq 0 $((n - 1))); do
            p=${plugins[$(((round - 1 + k) % n))]}
            read -r name path env <<<"$p"
            echo "compare-peers-wire: round $round: serving $name" >&2
            # shellcheck disable=SC2086 # the plugin's environment is a list of VAR=VALUE words
            env $env "$NETBENCH" --plugin "$path" --server "$HALO_GUEST_IP:$PORT" --timeout 900 ||
                echo "compare-peers-wire: $name server failed (round $round)" >&2
        done
    done
    for round in $(seq "$ROUNDS"); do
        perftest ib_write_lat -s 8 -n 2000
        perftest ib_write_lat -s 4096 -n 2000
        perftest ib_write_bw -s 1048576 -n 200
    done
    exit 0
fi

list="" envs=()
for p in "${plugins[@]}"; do
    read -r name path env <<<"$p"
    list+=",$name=$path"
    for kv in $env; do envs+=(--env "$name:$kv"); done
done
# The comparison so far is kept on the host after every run (see softroce --share).
save=()
[ -n "${HALO_GUEST_SHARE:-}" ] && save=(--save "$HALO_GUEST_SHARE/compare.json")
set +e
set -x
"$NETBENCH" --compare "${list#,}" "${envs[@]}" --connect "$HALO_PEER_IP:$PORT" --wire-dev "$DEV" "${save[@]}" "${ARGS[@]}"
status=$?
set +x
# perftest's rounds follow the plugins' (guest a serves them in the same order).
for round in $(seq "$ROUNDS"); do
    perftest ib_write_lat -s 8 -n 2000 || status=1
    perftest ib_write_lat -s 4096 -n 2000 || status=1
    perftest ib_write_bw -s 1048576 -n 200 || status=1
done
exit $status
