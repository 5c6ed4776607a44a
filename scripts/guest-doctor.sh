#!/usr/bin/env bash
# `halo doctor --peer` between two Soft-RoCE guests on the running system (scripts/guest-cluster.sh
# sets up the two guests, the worker's OpenSSH server and the cluster.toml). On the head:
#   1. `halo doctor --peer 198.18.0.1 --json` with the config as it is: passwordless SSH
#      (peer.ssh.*), the two links compared (peer.link.*: same RoCE version, GID type, subnet,
#      GID index and MTU in both guests) and the RDMA ping (peer.rdma.*: ib_send_lat server on the
#      worker over SSH, client here) must all pass, the ping with a measured latency; the worker's
#      own report must have come back (its halo is the config's [bench] halo).
#   2. the same with gid_index = 0 for the worker in the config (its link-local IPv6 GID, the usual
#      mistake): the ping must fail and say why, and the fix must name the right index.
# Other checks fail in a guest (no GPU, no ROCm), so the doctor exits 1: only these checks count.
#
# usage: scripts/guest-doctor.sh [--profile debug|release]
set -euo pipefail
cd "$(dirname "$0")/.."
peer=198.18.0.1

if [[ ${1:-} == --in-guest ]]; then
    # On the head guest, with HALO_CONFIG, HALO_BIN and HALO_GID_A from guest-cluster.sh.
    doctor() {
        local rc=0 t0=$SECONDS
        "$HALO_BIN" --config "$1" doctor --peer "$peer" --json >"$2" || rc=$?
        echo "  (halo doctor: exit $rc, $((SECONDS - t0)) s)"
        # 1: some check failed (no GPU here); anything else is the doctor itself failing.
        [[ $rc == 0 || $rc == 1 ]] || { echo "halo doctor exited $rc" >&2; exit 1; }
    }
    # check REPORT.json [ID VERDICT VALUE_REGEX FIX_REGEX]...: prints each check as a JSON line.
    check() {
        python3 - "$@" <<'PY'
import json, re, sys
report = json.load(open(sys.argv[1]))
checks = {c["id"]: c for c in report["checks"]}
ok = True
args = sys.argv[2:]
for cid, verdict, value_re, fix_re in zip(args[0::4], args[1::4], args[2::4], args[3::4]):
    c = checks.get(cid)
    print("  " + json.dumps(c))
    if c is None:
        print(f"FAIL: no check {cid}")
        ok = False
    elif c["verdict"] != verdict or not re.fullmatch(value_re, c["value"]) or not re.search(fix_re, c["fix"] or ""):
        print(f"FAIL: {cid}: want {verdict}, value ~ {value_re!r}, fix ~ {fix_re!r}")
        ok = False
peers = report.get("peers", [])
remote = peers[0] if peers else {}
if (remote.get("link") or {}).get("ip") != "198.18.0.1" or any(c["id"] == "doctor.remote" for c in remote.get("checks", [])):
    print("FAIL: the worker's own report did not come back: " + json.dumps(remote)[:600])
    ok = False
sys.exit(0 if ok else 1)
PY
    }
    g=$HALO_GID_A
    p=${peer//./\\.}
    echo "== 1. halo doctor --peer $peer --json, cluster.toml as set up (worker GID index $g)"
    doctor "$HALO_CONFIG" /tmp/doctor.json
    check /tmp/doctor.json \
        "peer.ssh.$peer" pass "ssh $p true: ok \(cluster config\)" '' \
        "peer.link.$peer" pass "RoCE v2 GID $g \(IPv4\), subnet 198\.18\.0\.0/24, MTU 9000 on both" '' \
        "peer.rdma.$peer" pass "ib_send_lat to rxe0 index $g on $p: [0-9]+\.[0-9]+ us typical" ''

    # Index 0 is the default GID, from the MAC: fe80::… (IPv6), never the IPv4 cluster address.
    gid0=$(cat /sys/class/infiniband/rxe0/ports/1/gids/0)
    [[ $g != 0 && $gid0 == fe80:* ]] || { echo "GID 0 is $gid0 and the worker's index $g: no wrong index to test with" >&2; exit 1; }
    python3 -c '
import re, sys
text = open(sys.argv[1]).read()
head, worker = text.split("host = \"198.18.0.1\"")
open(sys.argv[2], "w").write(head + "host = \"198.18.0.1\"" + re.sub(r"gid_index = \d+", "gid_index = 0", worker))
' "$HALO_CONFIG" /tmp/cluster-gid0.toml
    echo "== 2. the same with gid_index = 0 for $peer in cluster.toml: the ping must fail"
    doctor /tmp/cluster-gid0.toml /tmp/doctor-gid0.json
    check /tmp/doctor-gid0.json \
        "peer.ssh.$peer" pass '.*' '' \
        "peer.link.$peer" pass '.*' '' \
        "peer.rdma.$peer" fail "to rxe0 index 0 on $p: Found Incompatibility issue with GID types\." \
        "^in cluster\.toml set rdma_device = \"rxe0\", gid_index = $g for $p .*one GID is IPv4 and the other IPv6"
    echo "guest-doctor: all checks as expected"
    exit 0
fi

profile=debug
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        *) echo "usage: $0 [--profile debug|release]" >&2; exit 2 ;;
    esac
done
exec scripts/guest-cluster.sh --profile "$profile" --timeout 600 -- "$(pwd)/scripts/guest-doctor.sh" --in-guest
