#!/usr/bin/env bash
# Boots the Linux RDMA guest (built by setup.sh) under QEMU TCG on a tap inside a network
# namespace this script creates, and removes everything again when it exits — normally, on
# failure, or on SIGTERM/SIGINT/SIGHUP (traps).
#
#   run.sh --script FILE           boot, run FILE in the guest, print its output, power off,
#                                  exit with its exit code (by hand)
#   run.sh --share DIR             boot and serve commands from DIR/cmd (what the tests use;
#                                  see docs/linux-interop.md); exits when the guest powers off
# Options:
#   --name NS        network namespace to create (default ferry-rxe-<pid>; must not exist)
#   --host-ip A/N    address of the tap inside the namespace (default 10.77.0.1/24)
#   --guest-ip A/N   the guest's eth0 / rxe0 address (default 10.77.0.2/24)
#   --serial FILE    serial console log (default: <share>/serial.log)
#   --memory MB      guest memory (default 512)
# The tap is called tap0 inside the namespace; run host-side processes with
# `ip netns exec NS ...` and they reach the guest at its address.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
GUEST="${FERRY_LINUX_GUEST_DIR:-$REPO/target/linux-rdma-guest}"

die() { echo "linux-rdma-guest run: $*" >&2; exit 2; }

ns="ferry-rxe-$$"
host_ip=10.77.0.1/24
guest_ip=10.77.0.2/24
share=
script=
serial=
memory=512
while [ $# -gt 0 ]; do
    case "$1" in
        --name) ns=$2; shift 2 ;;
        --host-ip) host_ip=$2; shift 2 ;;
        --guest-ip) guest_ip=$2; shift 2 ;;
        --share) share=$2; shift 2 ;;
        --script) script=$2; shift 2 ;;
        --serial) serial=$2; shift 2 ;;
        --memory) memory=$2; shift 2 ;;
        *) die "unknown argument $1" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, taps)"
if [ ! -f "$GUEST/initramfs.cpio.gz" ] || [ ! -f "$GUEST/vmlinuz" ]; then
    die "no guest image in $GUEST: run scripts/linux-rdma-guest/setup.sh first"
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is not installed (setup.sh)"
[ -e /dev/net/tun ] || die "/dev/net/tun is missing"

own_share=0
if [ -z "$share" ]; then
    [ -n "$script" ] || die "give --script FILE or --share DIR"
    share=$(mktemp -d /tmp/ferry-rxe-share.XXXXXX)
    own_share=1
fi
mkdir -p "$share/out" "$share/cmd"
[ -n "$script" ] && cp "$script" "$share/script"
[ -n "$serial" ] || serial="$share/serial.log"

ns_made=0
qemu_pid=
# shellcheck disable=SC2317  # runs from the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    if [ "$ns_made" = 1 ]; then
        # Whatever else was started inside the namespace (captures, peers) goes with it.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    fi
    [ "$own_share" = 1 ] && rm -rf "$share"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

ip netns add "$ns" || die "cannot create network namespace $ns"
ns_made=1
ip -n "$ns" link set lo up
ip -n "$ns" tuntap add dev tap0 mode tap
ip -n "$ns" addr add "$host_ip" dev tap0
ip -n "$ns" link set tap0 up

accel=(-accel tcg -cpu max)
ip netns exec "$ns" qemu-system-x86_64 "${accel[@]}" -m "$memory" -smp 1 \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "console=ttyS0 loglevel=4 panic=-1 ferry.ip=$guest_ip" \
    -serial "file:$serial" \
    -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:77:00:02 \
    -virtfs "local,path=$share,mount_tag=host,security_model=none,id=host0" &
qemu_pid=$!
set +e
wait "$qemu_pid"
qrc=$?
set -e
qemu_pid=

if [ -n "$script" ]; then
    [ -f "$share/out/script.out" ] && cat "$share/out/script.out"
    if [ -f "$share/out/script.rc" ]; then
        exit "$(cat "$share/out/script.rc")"
    fi
    echo "linux-rdma-guest run: the guest did not finish the script (qemu exit $qrc); serial log:" >&2
    tail -n 40 "$serial" >&2 || true
    exit 2
fi
exit "$qrc"
