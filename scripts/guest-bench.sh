#!/usr/bin/env bash
# `halo bench` between two Soft-RoCE guests, run the way a cluster owner runs it: from the head
# alone, with a cluster.toml (scripts/guest-cluster.sh sets up the two guests, the worker's
# OpenSSH server and the config). `halo bench` on the head starts the worker's
# `halo bench --listen` over SSH, with the RDMA device, GID index and plugin from the config, and
# measures TCP, perftest and the plugin (latency, bandwidth, 2-rank all-reduce).
#
# usage: scripts/guest-bench.sh [--profile debug|release] [--full] [-- EXTRA HALO BENCH ARGS]
# The halo binary and plugin must be built in that profile (cargo build [--release] -p halo
# -p rccl-net-plugin).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
quick=(--quick)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --full) quick=(); shift ;;
        --) shift; break ;;
        *) echo "usage: $0 [--profile debug|release] [--full] [-- HALO BENCH ARGS]" >&2; exit 2 ;;
    esac
done
exec scripts/guest-cluster.sh --profile "$profile" --timeout 900 -- \
    "$(pwd)/target/$profile/halo" bench --connect-wait 300 "${quick[@]}" "$@"
