#!/usr/bin/env bash
# The project's whole test suite, from a fresh Debian 12 / Ubuntu machine (as root):
#   1. installs what the build, the guests and the harness tests need (scripts/setup*.sh);
#   2. cargo fmt --check, clippy -D warnings, and every host test (unit, proptest, ABI layout;
#      tests that need an RDMA device say "SKIPPED (no RDMA device)" here);
#   3. boots a Soft-RoCE QEMU guest and runs every device test there with HALO_REQUIRE_RDMA=1;
#   4. on Debian, boots a guest on the backports kernel (which has /dev/udmabuf) and runs the
#      GPU-direct tests there, so the stand-in runtime exports real dma-bufs;
#   5. boots two guests joined by a wire and runs the verbs and plugin checks across it, takes
#      one guest's link down mid-stream, and runs `halo bench` and `halo doctor --peer` from the
#      head guest with a cluster.toml (the worker reached over SSH).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { printf '\n==== %s (%ss)\n' "$*" "$(($(date +%s) - start))"; }

step "setup"
bash scripts/setup.sh
bash scripts/setup-harness.sh
if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (https://rustup.rs) and run again" >&2
    exit 1
fi

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

step "build (plugin, examples, test executables)"
cargo build --workspace --all-targets
cargo test --workspace --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
wanted = {"device", "plugin_smoke", "conformance", "allreduce", "plugin_probe", "hot_path", "gpu_direct", "netbench", "eager", "nap", "wire_version", "handshake", "kill", "reload", "abi_points", "conformance_cmd"}
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in wanted and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' | sort -u >target/guest-tests.list
cat target/guest-tests.list

step "host tests"
cargo test --workspace

step "Soft-RoCE guest: device tests"
scripts/softroce run --timeout 1500 -- scripts/guest-tests.sh

step "Soft-RoCE guest on the backports kernel: GPU-direct tests with real dma-bufs (udmabuf)"
if grep -qx 'ID=debian' /etc/os-release; then
    gpu_direct=$(awk '$1 == "gpu_direct" {print $2}' target/guest-tests.list)
    scripts/softroce run --kernel backports --timeout 900 --env HALO_REQUIRE_RDMA=1 \
        --env HALO_REQUIRE_UDMABUF=1 -- "$gpu_direct" --test-threads=1
else
    echo "skipped: the backports kernel is Debian's (this host is not Debian)"
fi

step "two Soft-RoCE guests over a wire"
# A guest whose kernel reports its NIC stuck for a minute ends a two-guest run at once, saying so
# (rather than leaving both commands to wait out their timeouts).
rc=0
out=$(scripts/softroce run2 --timeout 300 \
    --a "echo '<2>virtio_net virtio3 eth0: NETDEV WATCHDOG: CPU: 0: transmit queue 0 timed out 61000 ms' >/dev/kmsg && sleep 250" \
    --b 'sleep 250' 2>&1) || rc=$?
if [[ $rc != 125 || $out != *"guest a: its virtual NIC has not transmitted for 61 s"* ]]; then
    echo "softroce: a guest NIC reported stuck did not end the run (exit $rc): $out" >&2
    exit 1
fi
# ... and shows what each guest's wire carried and what guest a's kernel said about it.
if [[ $out != *"[a] wire: up "*"eth0 tx "* || $out != *"[b] wire: up "* || $out != *"[a] | "*"NETDEV WATCHDOG"* \
    || $out != *"[b] wire: frames to this guest dropped on the host (its QEMU's socket full): 0"* ]]; then
    echo "softroce: a failed two-guest run did not report the guests' wire counters and kernel lines: $out" >&2
    exit 1
fi
scripts/softroce run2 --timeout 600 -- target/debug/examples/wire_check -- target/debug/examples/wire_check
conf="target/debug/examples/conformance --plugin target/debug/librccl_net_plugin.so --version 10 --messages 200 --max-size 1048576 --seed 7"
scripts/softroce run2 --timeout 900 \
    --a "$conf --role recv --listen-on \$HALO_GUEST_IP:18600" \
    --b "$conf --role send --connect \$HALO_PEER_IP:18600"
# Soak at CI size (the full run is 10^6 messages, see examples/conformance.rs): sizes 0 B to
# 64 KiB, 1 % up to 8 MiB, multi-receives with shuffled tags; both sides must report every message
# and the same digest of all checksums. HALO_EAGER_MAX and HALO_RECV_NAP_US are unset, so across
# nodes the receiver offers eager slots of 8 KiB and its streaming receives nap (rxe is a software
# device): its accept line must say both, and some sends must have gone eagerly.
soak="env -u HALO_EAGER_MAX -u HALO_RECV_NAP_US NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET HALO_STATS=1 target/debug/examples/conformance --plugin target/debug/librccl_net_plugin.so --version 10 --soak --messages 5000 --seed 11"
scripts/softroce run2 --timeout 600 \
    --a "$soak --role recv --listen-on \$HALO_GUEST_IP:18600" \
    --b "$soak --role send --connect \$HALO_PEER_IP:18600" | tee target/soak.log | { grep -v 'NET/halo' || true; }
digests=$(sed -n 's/^\[[ab]\] SOAK [A-Za-z]*: \([0-9]*\) of \([0-9]*\) messages, 0 lost, 0 corrupted, digest \([0-9a-f]*\),.*/\1 \2 \3/p' target/soak.log | sort -u)
if [[ -z $digests || $(wc -l <<<"$digests") != 1 || $(cut -d' ' -f1 <<<"$digests") != $(cut -d' ' -f2 <<<"$digests") ]]; then
    echo "soak: the two sides disagree or lost messages: $digests" >&2
    exit 1
fi
if ! grep -q '^\[a\] .*NET/halo : accepted .*; eager messages up to 8192 B; receive naps of 20 us after 200 us' target/soak.log ||
    ! grep -Eq '^\[b\] .*stats: send comm to .* eager_sent=[1-9]' target/soak.log; then
    echo "soak: with HALO_EAGER_MAX and HALO_RECV_NAP_US unset, the receiver across the wire offered no eager slots or no naps, or no send went eagerly:" >&2
    grep -E 'accepted|stats:' target/soak.log >&2
    exit 1
fi
# One guest takes its link down with requests outstanding: its comms must fail within 2 s.
scripts/softroce run2 --timeout 600 \
    --a 'target/debug/examples/link_down --plugin target/debug/librccl_net_plugin.so --role down --listen-on $HALO_GUEST_IP:18800 --ifname eth0' \
    --b 'target/debug/examples/link_down --plugin target/debug/librccl_net_plugin.so --role peer --connect $HALO_PEER_IP:18800 --peer-wait 15'
# halo bench from the head alone: the worker's listener is started over SSH from a cluster.toml.
scripts/guest-bench.sh -- --plot /tmp/bench.png
# halo doctor --peer from the head: SSH, the two links compared and the RDMA ping must pass; with
# gid_index = 0 for the worker in cluster.toml the ping must fail and the fix name the right index.
scripts/guest-doctor.sh

step "a directory under /tmp is visible in the guest"
repo=$(pwd)
tmpdir=$(mktemp -d /tmp/halo-tmpcheck.XXXXXX)
echo visible >"$tmpdir/marker"
(cd "$tmpdir" && "$repo/scripts/softroce" run --mem 2048 --timeout 600 -- sh -c 'test "$(cat marker)" = visible && touch /tmp/writable')
rm -rf "$tmpdir"

step "done"
echo "all tests passed in $(($(date +%s) - start)) s"
