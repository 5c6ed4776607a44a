#!/bin/busybox sh
# /init of the Soft-RoCE guest initramfs (see scripts/softroce).
#
# Console layout: ttyS1 is the kernel console (captured to a file on the host for
# crash reports); ttyS0 carries only the test command's output (streamed by the host).
# /ctl is a per-run writable 9p share: config.sh and run.sh come in, status goes out.

/bin/busybox mkdir -p /proc /sys /dev /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

OUT=/dev/ttyS0
stty -F "$OUT" -opost -echo 2>/dev/null

say() { echo "softroce-guest: $*" >"$OUT"; }

# Ends the guest. The status file is what the host reads as the command's exit code;
# a missing file means the guest died before getting here.
finish() {
    if [ -n "$CTL_OK" ]; then
        echo "$1" >/ctl/status
        sync
    fi
    # QEMU runs with -no-reboot, so a reboot ends it; unlike poweroff it needs no ACPI.
    reboot -f
    sleep 5
}

fail() {
    say "$*"
    finish 125
}

load_group() {
    while read -r group mod; do
        [ "$group" = "$1" ] || continue
        insmod "/lib/modules/$mod.ko" 2>"$OUT" || fail "insmod $mod failed"
    done </modules.order
}

NINEP_OPTS=trans=virtio,version=9p2000.L,msize=512000

load_group base
mount -t 9p -o "$NINEP_OPTS" ctl /ctl || fail "cannot mount the control share"
CTL_OK=1
date +%s >/ctl/t_init
. /ctl/config.sh

# Load the RDMA (and NIC) modules while the 9p mounts below proceed; a failure there
# ends the guest through fail().
{
    load_group rdma
    [ "$MODE" = single ] || load_group net
} &
MODLOAD=$!

NR=/newroot
mount -t 9p -o "$NINEP_OPTS,ro,cache=loose" hostroot "$NR" || fail "cannot mount the host root"
mount -t proc proc "$NR/proc" || fail "cannot mount proc"
mount -t sysfs sysfs "$NR/sys" || fail "cannot mount sysfs"
mount -t devtmpfs devtmpfs "$NR/dev" || fail "cannot mount devtmpfs"
mkdir -p "$NR/dev/pts" "$NR/dev/shm"
# devtmpfs lacks the links udev would add; shells and tools expect them.
ln -s /proc/self/fd "$NR/dev/fd"
ln -s /proc/self/fd/0 "$NR/dev/stdin"
ln -s /proc/self/fd/1 "$NR/dev/stdout"
ln -s /proc/self/fd/2 "$NR/dev/stderr"
mount -t devpts devpts "$NR/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$NR/dev/shm"
# The guest's /tmp is its own tmpfs; host directories listed in /ctl/tmp_binds (a checkout
# under /tmp) are bound back in at their paths, from a handle on the host's /tmp taken first.
mkdir -p /hosttmp
mount -o bind "$NR/tmp" /hosttmp || fail "cannot bind the host's /tmp"
mount -t tmpfs -o mode=1777 tmpfs "$NR/tmp" || fail "cannot mount /tmp"
while read -r dir; do
    [ -n "$dir" ] || continue
    mkdir -p "$NR$dir"
    mount -o bind "/hosttmp/${dir#/tmp/}" "$NR$dir" || fail "cannot map $dir into the guest"
done </ctl/tmp_binds
mount -t tmpfs -o mode=755 tmpfs "$NR/run" || fail "cannot mount /run"
# The share may live under a path the tmpfs mounts just hid (e.g. /tmp): recreate it.
mkdir -p "$NR$SHARE_PATH"
mount -t 9p -o "$NINEP_OPTS" share "$NR$SHARE_PATH" || fail "cannot mount the share at $SHARE_PATH"
mkdir -p "$NR/run/halo"
cp /ctl/env.sh /ctl/run.sh "$NR/run/halo/" || fail "cannot stage the command"

wait "$MODLOAD"
ip link set lo up || fail "cannot bring lo up"
if [ "$MODE" = single ]; then
    NETDEV=lo
else
    NETDEV=eth0
    ip link set "$NETDEV" mtu 9000 || fail "cannot set MTU 9000 on $NETDEV"
    ip addr add "$GUEST_IP/24" dev "$NETDEV" || fail "cannot add $GUEST_IP to $NETDEV"
    ip link set "$NETDEV" up || fail "cannot bring $NETDEV up"
fi
chroot "$NR" rdma link add rxe0 type rxe netdev "$NETDEV" 2>"$OUT" \
    || fail "rdma link add rxe0 netdev $NETDEV failed"

PORT=/sys/class/infiniband/rxe0/ports/1
n=0
until grep -q ACTIVE "$PORT/state" 2>/dev/null; do
    n=$((n + 1))
    [ $n -le 100 ] || fail "rxe0 port never became ACTIVE ($(cat "$PORT/state" 2>/dev/null))"
    sleep 0.1
done

# The RoCE v2 GID that carries this guest's IPv4 address; index 0 is link-local and
# not routable, so tests must not assume it.
want_gid=$(echo "$GUEST_IP" | awk -F. '{ printf "0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x", $1, $2, $3, $4 }')
GID_INDEX=
n=0
while [ -z "$GID_INDEX" ]; do
    for g in "$PORT"/gids/*; do
        i=${g##*/}
        if [ "$(cat "$g" 2>/dev/null)" = "$want_gid" ] \
            && [ "$(cat "$PORT/gid_attrs/types/$i" 2>/dev/null)" = "RoCE v2" ]; then
            GID_INDEX=$i
            break
        fi
    done
    [ -n "$GID_INDEX" ] && break
    n=$((n + 1))
    [ $n -le 100 ] || fail "no RoCE v2 GID for $GUEST_IP on rxe0"
    sleep 0.1
done
echo "export HALO_RDMA_GID_INDEX=$GID_INDEX" >"$NR/run/halo/guest.env"

if [ "$MODE" != single ]; then
    # Rendezvous: the peer boots concurrently; wait (bounded) until it answers.
    n=0
    until ping -c 1 -W 1 "$PEER_IP" >/dev/null 2>&1; do
        n=$((n + 1))
        [ $n -le "$PEER_WAIT" ] || fail "peer $PEER_IP did not answer within ${PEER_WAIT} tries"
    done
fi

# What the wire has carried, for the host to print when a two-guest run fails: the NIC's
# packet counters and rxe's non-zero counters (retries, sequence errors, ...), one line.
wire_state() {
    S=/sys/class/net/$NETDEV/statistics
    printf 'up %ss: %s tx %s rx %s tx_dropped %s rx_dropped %s; rxe0' "$(cut -d' ' -f1 /proc/uptime)" \
        "$NETDEV" "$(cat $S/tx_packets)" "$(cat $S/rx_packets)" "$(cat $S/tx_dropped)" "$(cat $S/rx_dropped)"
    for f in "$PORT"/hw_counters/*; do
        [ "${f##*/}" = lifespan ] && continue
        v=$(cat "$f" 2>/dev/null)
        [ -n "$v" ] && [ "$v" != 0 ] && printf ' %s=%s' "${f##*/}" "$v"
    done
    echo
}
# Replaces /ctl/wire whole, so the host never reads half a line.
save_wire_state() {
    wire_state >/ctl/wire.tmp 2>/dev/null && mv /ctl/wire.tmp /ctl/wire
}
if [ "$MODE" = pair ]; then
    # Every 10 s while the command runs: a guest killed after its peer failed leaves its last line.
    ( while :; do save_wire_state; sleep 10; done ) &
    SAMPLER=$!
fi

date +%s >/ctl/t_ready
ulimit -l unlimited
if [ "$TTY" = 1 ]; then
    env -i chroot "$NR" /bin/sh /run/halo/run.sh </dev/null >"$OUT" 2>&1
    rc=$?
else
    # The host's output is not a terminal: hide the serial line behind a pipe so the
    # command does not emit colours or terminal control sequences.
    set -o pipefail
    env -i chroot "$NR" /bin/sh /run/halo/run.sh </dev/null 2>&1 | cat >"$OUT"
    rc=$?
    set +o pipefail
fi
if [ -n "$SAMPLER" ]; then
    kill "$SAMPLER" 2>/dev/null
    save_wire_state
fi
umount "$NR$SHARE_PATH" 2>/dev/null
finish "$rc"
