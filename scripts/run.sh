#!/usr/bin/env bash
# The main job: builds the plugin and shows the RDMA devices, GIDs and plugin devices it sees.
# On a machine with an RDMA NIC this runs directly; without one (no /dev/infiniband) it runs
# inside a Soft-RoCE QEMU guest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p rccl-net-plugin
cargo build --release --example devices
echo "plugin: $(pwd)/target/release/librccl_net_plugin.so (install as librccl-net-halo.so: scripts/install-plugin.sh)"
if ls /dev/infiniband/uverbs* >/dev/null 2>&1; then
    target/release/examples/devices
else
    echo "no RDMA device on this machine: showing a Soft-RoCE guest's view"
    scripts/softroce run --timeout 600 -- target/release/examples/devices
fi
