#!/usr/bin/env bash
# Instructions per plugin call, counted by callgrind (repeatable where timings under emulation are
# not): examples/callcost drives each plugin through its C ABI in fixed phases, and this script
# turns the call graph into instructions per isend (NULL and posting), irecv and test (finding
# nothing, completing a send, completing a receive). Run it where the device is, e.g.
#
#   scripts/softroce run --mem 2048 --timeout 1200 -- scripts/callcost.sh \
#       halo=target/release/librccl_net_plugin.so nccl-ib=PATH/libnccl-net.so [--size 8]
#
# Needs valgrind. Arguments: NAME=PATH (one per plugin), then callcost options (--size,
# --messages, --idle, --dev). Plugins get NCCL_IB_HCA=${NCCL_IB_HCA:-rxe0}. A plugin's entry
# points are found by name: halo's abi::*, or ncclIbIsend / ncclIbIrecv / ncclIbTest.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROG=$ROOT/target/release/examples/callcost
command -v valgrind >/dev/null || { echo "callcost: valgrind is not installed" >&2; exit 2; }
[ -x "$PROG" ] || { echo "callcost: build it first: cargo build --release -p halo-rdma --example callcost" >&2; exit 2; }
plugins=() args=()
for a in "$@"; do
    case "$a" in *=*) plugins+=("$a") ;; *) args+=("$a") ;; esac
done
[ ${#plugins[@]} -gt 0 ] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for p in "${plugins[@]}"; do
    name=${p%%=*} path=${p#*=}
    mkdir -p "$out/$name"
    NCCL_IB_HCA=${NCCL_IB_HCA:-rxe0} valgrind --tool=callgrind --separate-callers=3 \
        --callgrind-out-file="$out/$name/cg.out" "$PROG" --plugin "$path" "${args[@]}" \
        >"$out/$name/stdout" 2>"$out/$name/stderr" ||
        { echo "callcost: $name failed:" >&2; tail -5 "$out/$name/stderr" >&2; exit 1; }
done
python3 - "$out" "${plugins[@]}" <<'EOF'
import collections, re, sys
out, plugins = sys.argv[1], [p.split('=', 1)[0] for p in sys.argv[2:]]
ENTRY = {'isend': ('rccl_net_plugin::abi::v10::isend', 'ncclIbIsend'),
         'irecv': ('rccl_net_plugin::abi::v10::irecv', 'ncclIbIrecv'),
         'test': ('rccl_net_plugin::abi::v6::test', 'ncclIbTest')}
PHASES = {'idle_isends': 'isend', 'msg_isend': 'isend', 'msg_irecv': 'irecv',
          'idle_tests': 'test', 'msg_test_send': 'test', 'msg_test_recv': 'test'}

def edges(path):
    """(calls, inclusive Ir) per called function context of a callgrind file."""
    names, calls, incl = {}, collections.Counter(), collections.Counter()
    cfn, pending = None, None
    for line in open(path, errors='replace'):
        if line.startswith(('fn=', 'cfn=')):
            m = re.match(r'c?fn=\((\d+)\)(?: (.*))?', line.rstrip('\n'))
            if m.group(2) is not None:
                names[m.group(1)] = m.group(2)
            if line.startswith('cfn='):
                cfn = names.get(m.group(1))
        elif line.startswith('calls='):
            pending = int(line[6:].split()[0])
        elif pending is not None and (line[0].isdigit() or line[0] in '+-*'):
            calls[cfn] += pending
            incl[cfn] += int(line.split()[1])
            pending = None
    return calls, incl

print(f"{'plugin':10s} {'isend NULL':>10s} {'isend':>7s} {'irecv':>7s} {'test idle':>9s} "
      f"{'test send':>9s} {'test recv':>9s}   (instructions per call)")
for name in plugins:
    calls, incl = edges(f'{out}/{name}/cg.out')
    text = open(f'{out}/{name}/stdout').read()
    nulls = int(re.search(r'\(NULL (\d+)\)', text).group(1))
    ph = {}
    for phase, entry in PHASES.items():
        k = i = 0
        for n in calls:
            parts = (n or '').split("'")
            if parts[0] in ENTRY[entry] and any(phase in p for p in parts[1:]):
                k, i = k + calls[n], i + incl[n]
        ph[phase] = (k, i)
    per = lambda p: ph[p][1] / max(ph[p][0], 1)
    idle_isend, idle_test, msgs = per('idle_isends'), per('idle_tests'), ph['msg_irecv'][0]
    k, i = ph['msg_isend']
    isend = (i - nulls * idle_isend) / max(k - nulls, 1)
    # The last test of each request completes it; the others are charged as tests finding nothing.
    done = lambda p: (ph[p][1] - (ph[p][0] - msgs) * idle_test) / max(msgs, 1)
    print(f"{name:10s} {idle_isend:10.0f} {isend:7.0f} {per('msg_irecv'):7.0f} {idle_test:9.0f} "
          f"{done('msg_test_send'):9.0f} {done('msg_test_recv'):9.0f}")
EOF
