#!/usr/bin/env bash
# The main job: builds the plugin and the halo command, then shows them working between two
# nodes: two Soft-RoCE QEMU guests (two kernels joined by a RoCE v2 wire). From the head guest,
# `halo bench` with a cluster.toml starts the worker's side over SSH and measures TCP, raw RDMA
# (perftest) and the plugin, including a 2-rank all-reduce through it; then this script says how
# to do the same on real nodes. Works from any directory, the checkout may be under /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
bash scripts/setup-harness.sh
cargo build --release -p rccl-net-plugin -p halo
echo "plugin: $(pwd)/target/release/librccl_net_plugin.so (install as librccl-net-halo.so: scripts/install-plugin.sh)"
echo "halo:   $(pwd)/target/release/halo"
if ls /dev/infiniband/uverbs* >/dev/null 2>&1; then
    echo "this machine's RDMA devices:"
    cargo build --release --example devices
    target/release/examples/devices
fi
echo
echo "== halo bench between two Soft-RoCE guests (head 198.18.0.2 -> worker 198.18.0.1 over SSH) =="
scripts/guest-bench.sh --profile release
cat <<'TXT'

== The same on real nodes ==
  on every node:  scripts/install-plugin.sh --prefix /opt/halo/lib; install target/release/halo
                  (apt-get install perftest; passwordless SSH from the head to the workers)
  on the head:    halo doctor --peer WORKER
                  halo cluster init --node strix1=192.168.100.1 --node strix2=192.168.100.2
                  halo bench --plot bench.png        # starts the worker's side over SSH
                  halo conformance --plugin /opt/halo/lib/librccl-net-halo.so
TXT
echo "main job done in $(($(date +%s) - start)) s"
