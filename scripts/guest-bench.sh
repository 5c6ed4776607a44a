#!/usr/bin/env bash
# `halo bench` between two Soft-RoCE guests (two kernels, a RoCE v2 wire), run the way a cluster
# owner runs it: from the head alone, with a cluster.toml. Guest a (198.18.0.1) is the worker:
# it only runs an OpenSSH server. Guest b (198.18.0.2) is the head: `halo bench` there starts the
# worker's `halo bench --listen` over SSH, with the RDMA device, GID index and plugin from the
# config, and measures TCP, perftest and the plugin (latency, bandwidth, 2-rank all-reduce).
#
# usage: scripts/guest-bench.sh [--profile debug|release] [--full] [-- EXTRA HALO BENCH ARGS]
# The halo binary and plugin must be built in that profile (cargo build [--release] -p halo
# -p rccl-net-plugin). The SSH keys, sshd config and cluster.toml live in a scratch directory
# that both guests see (softroce --share); it is removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
quick=--quick
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --full) quick=; shift ;;
        --) shift; break ;;
        *) echo "usage: $0 [--profile debug|release] [--full] [-- HALO BENCH ARGS]" >&2; exit 2 ;;
    esac
done
repo=$(pwd)
halo="$repo/target/$profile/halo"
plugin="$repo/target/$profile/librccl_net_plugin.so"
for f in "$halo" "$plugin"; do
    [[ -f $f ]] || { echo "$f is not built (cargo build -p halo -p rccl-net-plugin${profile/debug/})" >&2; exit 1; }
done
for p in /usr/sbin/sshd ssh ssh-keygen; do
    command -v "$p" >/dev/null || { echo "$p missing: run scripts/setup-harness.sh" >&2; exit 1; }
done

mkdir -p "$repo/target/softroce-bench"
share=$(mktemp -d "$repo/target/softroce-bench/run.XXXXXX")
# Kept when the run fails: sshd.log and the configs tell why.
trap 'rc=$?; if [[ $rc == 0 ]]; then rm -rf "$share"; else echo "guest-bench: files kept in $share" >&2; fi' EXIT
ssh-keygen -q -t ed25519 -N '' -f "$share/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$share/client_key"
cp "$share/client_key.pub" "$share/authorized_keys"
cat >"$share/sshd_config" <<EOF
ListenAddress 198.18.0.1
Port 22
HostKey $share/host_key
AuthorizedKeysFile $share/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PidFile /run/sshd-bench.pid
EOF
# The head (b) first: it runs halo bench. The worker (a) is reached over SSH.
cat >"$share/cluster.toml" <<EOF
[ray]
port = 6379
executable = "ray"
num_cpus = 2
num_gpus = 0
wait_secs = 120

[rccl]
plugin = "$plugin"
gdr_level = "SYS"
ib_timeout = 20
ib_retry_cnt = 7

[ssh]
key = "$share/client_key"
options = ["ConnectTimeout=120", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"]

[bench]
halo = "$halo"

[[nodes]]
host = "198.18.0.2"
ip = "198.18.0.2"
iface = "eth0"
rdma_device = "rxe0"
gid_index = GID_B

[[nodes]]
host = "198.18.0.1"
ip = "198.18.0.1"
iface = "eth0"
rdma_device = "rxe0"
gid_index = GID_A
EOF

# Each guest fills in its own RoCE v2 GID index (HALO_RDMA_GID_INDEX) for the other to read.
worker="echo \$HALO_RDMA_GID_INDEX >$share/gid_a
mkdir -p /run/sshd && /usr/sbin/sshd -f $share/sshd_config -E $share/sshd.log || exit 1
n=0; until [ -e $share/done ]; do n=\$((n + 1)); [ \$n -le 1500 ] || exit 1; sleep 0.4; done
exit \$(cat $share/done)"
head="n=0; until [ -s $share/gid_a ]; do n=\$((n + 1)); [ \$n -le 600 ] || exit 1; sleep 0.2; done
sed -e \"s/GID_B/\$HALO_RDMA_GID_INDEX/\" -e \"s/GID_A/\$(cat $share/gid_a)/\" $share/cluster.toml >/tmp/cluster.toml
$halo --config /tmp/cluster.toml bench --connect-wait 300 $quick $*; rc=\$?
echo 0 >$share/done
exit \$rc"
scripts/softroce run2 --mem 2048 --timeout 900 --share "$share" --a "$worker" --b "$head"
