#!/usr/bin/env bash
# Runs inside a Soft-RoCE guest (scripts/softroce run): every test that needs a real RDMA device,
# with HALO_REQUIRE_RDMA=1 so that a missing device fails instead of skipping, then perftest's
# ib_write_bw as a sanity baseline. Reads the test executables from target/guest-tests.list
# (written by scripts/test.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
export HALO_REQUIRE_RDMA=1 RUST_BACKTRACE=1
list=target/guest-tests.list
[[ -s $list ]] || { echo "guest-tests: $list is missing: run scripts/test.sh" >&2; exit 2; }

echo "== RDMA devices in the guest"
ibv_devices || exit 1
target/debug/examples/devices || exit 1

failed=()
while read -r name exe; do
    echo
    echo "== device test: $name"
    if ! "$exe" --test-threads=1 --nocapture; then
        failed+=("$name")
    fi
done <"$list"

echo
echo "== perftest baseline: ib_write_bw 1 MiB on ${HALO_RDMA_DEV:-rxe0} (GID index 1 = ::ffff:127.0.0.1)"
dev=${HALO_RDMA_DEV:-rxe0}
ib_write_bw -d "$dev" -x "${HALO_RDMA_GID_INDEX:-1}" -s 1048576 -n 200 -F >/tmp/bw-server.log 2>&1 &
server=$!
sleep 1
if timeout 120 ib_write_bw -d "$dev" -x "${HALO_RDMA_GID_INDEX:-1}" -s 1048576 -n 200 -F 127.0.0.1; then
    wait "$server"
else
    kill "$server" 2>/dev/null
    failed+=("ib_write_bw")
fi

echo
if ((${#failed[@]})); then
    echo "guest tests FAILED: ${failed[*]}"
    exit 1
fi
echo "guest tests passed"
