#!/usr/bin/env bash
# Two Soft-RoCE guests (two kernels, a RoCE v2 wire) set up as a two-node cluster, the way a
# cluster owner runs halo: from the head alone, with a cluster.toml. Guest a (198.18.0.1) is the
# worker: it only runs an OpenSSH server. Guest b (198.18.0.2) is the head: it runs HEAD_CMD with
# HALO_CONFIG naming the cluster.toml (halo reads it from there), in which both nodes have their
# RoCE v2 GID index, `[bench] halo` is this checkout's halo and `[rccl] plugin` its plugin.
# scripts/guest-bench.sh and scripts/guest-doctor.sh are built on it.
#
# usage: scripts/guest-cluster.sh [--profile debug|release] [--timeout SECS] -- HEAD_CMD [ARGS...]
# The halo binary and plugin must be built in that profile (cargo build [--release] -p halo
# -p rccl-net-plugin). The SSH keys, sshd config and cluster.toml live in a scratch directory
# that both guests see (softroce --share); it is removed afterwards, kept when the run fails.
# Inside the head guest: HALO_CONFIG=/tmp/cluster.toml, HALO_BIN=the halo binary,
# HALO_GID_A=the worker's RoCE v2 GID index.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
timeout=900
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [--profile debug|release] [--timeout SECS] -- HEAD_CMD [ARGS...]" >&2; exit 2 ;;
    esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [--profile debug|release] [--timeout SECS] -- HEAD_CMD [ARGS...]" >&2; exit 2; }
repo=$(pwd)
halo="$repo/target/$profile/halo"
plugin="$repo/target/$profile/librccl_net_plugin.so"
for f in "$halo" "$plugin"; do
    [[ -f $f ]] || { echo "$f is not built (cargo build -p halo -p rccl-net-plugin${profile/debug/})" >&2; exit 1; }
done
for p in /usr/sbin/sshd ssh ssh-keygen; do
    command -v "$p" >/dev/null || { echo "$p missing: run scripts/setup-harness.sh" >&2; exit 1; }
done

mkdir -p "$repo/target/softroce-cluster"
share=$(mktemp -d "$repo/target/softroce-cluster/run.XXXXXX")
# Kept when the run fails: sshd.log and the configs tell why.
trap 'rc=$?; if [[ $rc == 0 ]]; then rm -rf "$share"; else echo "guest-cluster: files kept in $share" >&2; fi' EXIT
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
PidFile /run/sshd-cluster.pid
EOF
# The head (b) first. The worker (a) is reached over SSH; its halo is this checkout's.
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

# HEAD_CMD as one shell line, each word single-quoted.
head_cmd=
for w in "$@"; do
    head_cmd+="'${w//\'/\'\\\'\'}' "
done
# Each guest fills in its own RoCE v2 GID index (HALO_RDMA_GID_INDEX) for the other to read.
# The worker writes its index once sshd listens on port 22 (sshd forks into the background
# before it binds): the head reads the file as the sign that it may connect.
worker="mkdir -p /run/sshd && /usr/sbin/sshd -f $share/sshd_config -E $share/sshd.log || exit 1
n=0; until awk '\$2 ~ /:0016\$/ && \$4 == \"0A\" { f = 1 } END { exit !f }' /proc/net/tcp; do
    n=\$((n + 1)); [ \$n -le 300 ] || { echo 'sshd is not listening on port 22 after 60 s' >&2; exit 1; }; sleep 0.2
done
echo \$HALO_RDMA_GID_INDEX >$share/gid_a.tmp && mv $share/gid_a.tmp $share/gid_a
n=0; until [ -e $share/done ]; do n=\$((n + 1)); [ \$n -le 1500 ] || exit 1; sleep 0.4; done
exit \$(cat $share/done)"
head="n=0; until [ -s $share/gid_a ]; do n=\$((n + 1)); [ \$n -le 600 ] || exit 1; sleep 0.2; done
sed -e \"s/GID_B/\$HALO_RDMA_GID_INDEX/\" -e \"s/GID_A/\$(cat $share/gid_a)/\" $share/cluster.toml >/tmp/cluster.toml
export HALO_CONFIG=/tmp/cluster.toml HALO_BIN='$halo' HALO_GID_A=\$(cat $share/gid_a)
$head_cmd; rc=\$?
echo 0 >$share/done
exit \$rc"
scripts/softroce run2 --mem 2048 --timeout "$timeout" --share "$share" --a "$worker" --b "$head"
