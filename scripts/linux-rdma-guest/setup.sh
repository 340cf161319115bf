#!/usr/bin/env bash
# Prepares the Linux RDMA guest Ferry's interoperability tests boot: installs the Debian packages
# (QEMU, rdma-core tools, busybox, tshark), unpacks a Debian kernel (its modules include
# rdma_rxe) and builds a small initramfs with busybox, the kernel modules rdma_rxe, virtio-net and
# 9p need, libibverbs/librdmacm with the rxe provider, and the rdma-core tools with every shared
# library they load. The result goes to $FERRY_LINUX_GUEST_DIR (default
# <repo>/target/linux-rdma-guest): vmlinuz, initramfs.cpio.gz, kernel-version.
#
# Idempotent and cached: a second run whose inputs (package versions, this script, the guest's
# init) did not change does nothing. Safe to run concurrently (flock).
#
#   bash scripts/linux-rdma-guest/setup.sh            # install what is missing and build
#   FERRY_LINUX_GUEST_NO_APT=1 bash .../setup.sh      # never call apt-get (fail if missing)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${FERRY_LINUX_GUEST_DIR:-$REPO/target/linux-rdma-guest}"

die() { echo "linux-rdma-guest setup: $*" >&2; exit 1; }
log() { echo "linux-rdma-guest setup: $*" >&2; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, network namespaces, taps)"

PACKAGES=(qemu-system-x86 rdmacm-utils ibverbs-utils ibverbs-providers rdma-core iproute2
          busybox-static tshark kmod cpio xz-utils)
OPTIONAL_PACKAGES=(perftest)

missing_packages() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || echo "$p"
    done
}

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

# --- packages ---------------------------------------------------------------------------------
missing=$(missing_packages "${PACKAGES[@]}" "${OPTIONAL_PACKAGES[@]}")
if [ -n "$missing" ]; then
    [ -z "${FERRY_LINUX_GUEST_NO_APT:-}" ] \
        || die "missing Debian packages: ${missing//$'\n'/ } (FERRY_LINUX_GUEST_NO_APT is set)"
    log "installing: ${missing//$'\n'/ }"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed"
    required=$(missing_packages "${PACKAGES[@]}")
    if [ -n "$required" ]; then
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $required >&2 \
            || die "apt-get install failed for: ${required//$'\n'/ }"
    fi
    for p in "${OPTIONAL_PACKAGES[@]}"; do
        if [ -n "$(missing_packages "$p")" ]; then
            apt-get install -y -q --no-install-recommends "$p" >&2 \
                || log "optional package $p is not available; continuing without it"
        fi
    done
fi

# --- the kernel -------------------------------------------------------------------------------
# The Debian kernel the linux-image-amd64 meta package points at, unpacked (not installed: the
# host keeps its own kernel and /boot untouched).
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
       | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then
    [ -z "${FERRY_LINUX_GUEST_NO_APT:-}" ] || die "apt does not know linux-image-amd64"
    apt-get update -q >&2 || die "apt-get update failed"
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$kpkg" ] || die "apt does not know linux-image-amd64 even after apt-get update"
fi
kver=${kpkg#linux-image-}
KROOT="$OUT/kernel/$kver"
if [ ! -e "$KROOT/.unpacked" ]; then
    log "downloading and unpacking $kpkg"
    rm -rf "$KROOT" "$OUT/kernel/dl"
    mkdir -p "$KROOT" "$OUT/kernel/dl"
    chmod 777 "$OUT/kernel/dl"  # apt-get download drops to the _apt user
    (cd "$OUT/kernel/dl" && apt-get download "$kpkg" >&2) || die "apt-get download $kpkg failed"
    dpkg -x "$OUT/kernel/dl/"*.deb "$KROOT" || die "dpkg -x of $kpkg failed"
    rm -rf "$OUT/kernel/dl"
    touch "$KROOT/.unpacked"
fi
[ -f "$KROOT/boot/vmlinuz-$kver" ] || die "$kpkg has no /boot/vmlinuz-$kver"
MODDIR="$KROOT/lib/modules/$kver"
[ -f "$MODDIR/modules.dep" ] || depmod -b "$KROOT" "$kver"

# --- the cache stamp --------------------------------------------------------------------------
stamp=$({
    echo "$kpkg"
    dpkg-query -W "${PACKAGES[@]}" "${OPTIONAL_PACKAGES[@]}" 2>/dev/null || true
    sha256sum "$HERE/setup.sh" "$HERE/init"
} | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/initramfs.cpio.gz" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$stamp" ]; then
    log "up to date: $OUT"
    exit 0
fi

# --- the initramfs ----------------------------------------------------------------------------
log "building the initramfs for $kver"
ROOT="$OUT/root"
rm -rf "$ROOT"
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,run,host,etc/libibverbs.d,usr/lib/x86_64-linux-gnu,usr/bin,usr/sbin,usr/lib64}
ln -s usr/lib "$ROOT/lib"
ln -s usr/lib64 "$ROOT/lib64"

cp /bin/busybox "$ROOT/bin/busybox"
for applet in $("$ROOT/bin/busybox" --list); do
    [ -e "$ROOT/bin/$applet" ] || ln -s busybox "$ROOT/bin/$applet"
done

# Copies a file to the same path in the image (the merged /lib becomes /usr/lib).
copy_file() {
    local src=$1 dst=$1
    case "$dst" in /lib/*|/lib64/*) dst="/usr$dst" ;; esac
    mkdir -p "$ROOT$(dirname "$dst")"
    cp -L "$src" "$ROOT$dst"
}

# Copies a binary or library with every shared library it needs.
copy_with_libs() {
    local f=$1 lib
    copy_file "$f"
    for lib in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' || true); do
        [ -e "$ROOT$lib" ] || [ -e "$ROOT/usr$lib" ] || copy_file "$lib"
    done
}

tools=()
for t in udaddy rping ucmatose rdma_server rdma_client mckey rdma_xserver rdma_xclient riostream \
         rstream ibv_devices ibv_devinfo ibv_rc_pingpong ibv_ud_pingpong ibv_srq_pingpong \
         ib_send_bw ib_send_lat ib_write_bw ib_write_lat ib_read_bw ib_read_lat rdma; do
    p=$(command -v "$t" || true)
    [ -n "$p" ] && tools+=("$p")
done
for t in udaddy rping ucmatose ibv_devices ibv_devinfo rdma; do
    command -v "$t" >/dev/null || die "$t is not installed (packages: ${PACKAGES[*]})"
done
for t in "${tools[@]}"; do
    copy_with_libs "$t"
    [ "$(dirname "$t")" = /usr/bin ] || cp -L "$t" "$ROOT/usr/bin/$(basename "$t")"
done

libdir=/usr/lib/x86_64-linux-gnu
provider=
for f in "$libdir"/libibverbs/librxe-rdmav*.so; do [ -f "$f" ] && provider=$f; done
[ -n "$provider" ] || die "the rxe provider (libibverbs/librxe-rdmav*.so, ibverbs-providers) is missing"
copy_with_libs "$provider"
[ -f /etc/libibverbs.d/rxe.driver ] || die "/etc/libibverbs.d/rxe.driver is missing (ibverbs-providers)"
cp /etc/libibverbs.d/rxe.driver "$ROOT/etc/libibverbs.d/"
for lib in "$libdir"/librdmacm.so.1 "$libdir"/libibverbs.so.1; do copy_with_libs "$lib"; done
# glibc dlopens libgcc_s for pthread_exit/cancellation (rping's threads); ldd does not list it.
[ -f "$libdir/libgcc_s.so.1" ] || die "$libdir/libgcc_s.so.1 is missing (libgcc-s1)"
copy_with_libs "$libdir/libgcc_s.so.1"
# rdma_cm's preload and address helpers look here; harmless when absent.
if [ -d /etc/rdma ]; then cp -r /etc/rdma "$ROOT/etc/"; fi

# Kernel modules in load order (kmod resolves modules.dep; built-ins print nothing).
: >"$ROOT/etc/modules.order"
for m in crc32_generic virtio_pci virtio_net 9pnet_virtio 9p rdma_rxe ib_uverbs rdma_ucm ib_umad; do
    modprobe -d "$KROOT" -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}' |
    while read -r ko; do
        rel=${ko#"$KROOT"}
        if [ ! -e "$ROOT$rel" ]; then
            mkdir -p "$ROOT$(dirname "$rel")"
            cp "$ko" "$ROOT$rel"
            echo "$rel" >>"$ROOT/etc/modules.order"
        fi
    done
done
grep -q rdma_rxe "$ROOT/etc/modules.order" || die "rdma_rxe.ko not found in $kpkg"

cp "$HERE/init" "$ROOT/init"
chmod 755 "$ROOT/init"
echo "root:x:0:0:root:/:/bin/sh" >"$ROOT/etc/passwd"
echo "root:x:0:" >"$ROOT/etc/group"
printf '127.0.0.1 localhost\n' >"$ROOT/etc/hosts"

(cd "$ROOT" && find . -print0 | sort -z | cpio --null -o -H newc --quiet | gzip -1) \
    >"$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
cp "$KROOT/boot/vmlinuz-$kver" "$OUT/vmlinuz"
echo "$kver" >"$OUT/kernel-version"
echo "$stamp" >"$OUT/stamp"
rm -rf "$ROOT"
log "built $OUT/initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1)) for $kver"
