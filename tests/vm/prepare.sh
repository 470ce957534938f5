#!/usr/bin/env bash
# Prepares what the VM lab boots (tests/README.md, the VM lab): Debian 12's current amd64
# kernel package, unpacked with its modules (depmod'ed), and a small initramfs holding
# busybox-static, tests/vm/init and only the 9p module chain. Everything else the VM runs comes
# from the host's root, shared read-only over 9p.
#
# Idempotent and fast when cached. Prints (and writes to $CACHE/env) the lines
#   KVER=…  VMLINUZ=…  KERNEL=…  INITRD=…  MODROOT=…
# KERNEL is what to boot (the uncompressed vmlinux when it has a PVH entry, else VMLINUZ);
# MODROOT is a directory with lib/modules/$KVER (for `modprobe -d MODROOT -S KVER`).
# Cache: ${MESHD_VM_CACHE:-/var/cache/meshd-vm}. Needs root (apt), kmod, cpio, gzip, xz,
# readelf (binutils).
set -Eeuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${MESHD_VM_CACHE:-/var/cache/meshd-vm}
busybox=${MESHD_VM_BUSYBOX:-/bin/busybox}
# What the initramfs needs to reach the host's root; the rest is loaded from there by init.
initrd_modules=(9p 9pnet_virtio virtio_pci)

die() { echo "prepare.sh: $*" >&2; exit 1; }

mkdir -p "$cache"
# Two test processes may prepare at once: one does the work, the other waits and finds it done.
exec 9>"$cache/lock"
flock 9

# The kernel package: linux-image-amd64 depends on the current linux-image-<KVER>-amd64 (the
# -cloud- flavour has no 9p).
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
  awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }' || true)
# The kernel prepared last time, if any: used when the current one cannot be fetched (offline).
last=
if [[ -f $cache/env ]]; then
  # shellcheck source=/dev/null disable=SC2153 # KVER comes from the env file
  last=$(. "$cache/env" && echo "$KVER")
fi

unpacked() { [[ -f $cache/$1/root/lib/modules/$1/modules.dep && -f $cache/$1/root/boot/vmlinuz-$1 ]]; }

# Download (if not cached) and unpack linux-image-$1 into $cache/$1/root, modules depmod'ed.
fetch() {
  local kver=$1 pkg=linux-image-$1 deb root=$cache/$1/root
  deb=$(compgen -G "$cache/${pkg}_*.deb" | head -n1 || true)
  if [[ -z $deb ]]; then
    echo "prepare.sh: downloading $pkg into $cache" >&2
    if ! (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2); then
      echo "prepare.sh: download failed; running apt-get update and trying again" >&2
      apt-get update -qq >&2 || true
      (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) || {
        echo "prepare.sh: apt-get download $pkg failed" >&2
        return 1
      }
    fi
    deb=$(compgen -G "$cache/${pkg}_*.deb" | head -n1 || true)
    [[ -n $deb ]] || { echo "prepare.sh: apt-get download $pkg left no .deb in $cache" >&2; return 1; }
  fi
  echo "prepare.sh: unpacking $deb" >&2
  mkdir -p "$cache/$kver"
  rm -rf "$root.tmp"
  dpkg -x "$deb" "$root.tmp" || { echo "prepare.sh: dpkg -x $deb failed" >&2; return 1; }
  depmod -b "$root.tmp" "$kver" || { echo "prepare.sh: depmod -b $root.tmp $kver failed" >&2; return 1; }
  rm -rf "$root"
  mv "$root.tmp" "$root"
}

kver=${pkg#linux-image-}
if [[ -z $pkg ]] || ! { unpacked "$kver" || fetch "$kver"; }; then
  if [[ -z $last ]] || ! unpacked "$last"; then
    die "no kernel to boot: ${pkg:-'apt-cache depends linux-image-amd64' names no package (run apt-get update)}"
  fi
  echo "prepare.sh: using the kernel prepared before, $last" >&2
  kver=$last
fi
pkg=linux-image-$kver
kdir=$cache/$kver
modroot=$kdir/root
vmlinuz=$modroot/boot/vmlinuz-$kver
[[ -f $vmlinuz ]] || die "$vmlinuz is missing from $pkg"

# The uncompressed kernel: qemu boots its ELF through the PVH entry point, skipping the BIOS
# and the xz decompression, which take about 2.7 s of a 6.5 s boot under TCG. The bzImage
# stays the fallback should a kernel ever come without PVH or xz.
vmlinux=$kdir/vmlinux
if [[ ! -f $vmlinux ]]; then
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1 || true)
  # xz stops reading at the end of the stream; the trailing bytes may cost tail a SIGPIPE.
  if [[ -n $off ]] && { tail -c +$((off + 1)) "$vmlinuz" || true; } |
    xz -dc --single-stream >"$vmlinux.tmp" 2>/dev/null &&
    LC_ALL=C readelf -n "$vmlinux.tmp" 2>/dev/null | grep -q 'Xen.*0x00000012'; then
    mv "$vmlinux.tmp" "$vmlinux"
  else
    echo "prepare.sh: no PVH vmlinux in $vmlinuz; booting the bzImage (slower)" >&2
    rm -f "$vmlinux.tmp"
  fi
fi
kernel=$vmlinuz
[[ -f $vmlinux ]] && kernel=$vmlinux

# The 9p chain in load order, without duplicates ("builtin" lines need nothing).
mapfile -t kos < <(
  for m in "${initrd_modules[@]}"; do
    modprobe -d "$modroot" -S "$kver" --show-depends "$m" || die "modprobe --show-depends $m failed"
  done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }'
)
((${#kos[@]})) || die "modprobe --show-depends ${initrd_modules[*]} found nothing under $modroot"

[[ -x $busybox ]] || die "$busybox is missing (apt-get install busybox-static)"
# ldd fails on a static binary; the initramfs has no libc for a dynamic one.
! ldd "$busybox" >/dev/null 2>&1 ||
  die "$busybox is dynamically linked: install busybox-static"

# Rebuilt whenever init, busybox or the module list changes; the name carries the hash.
stamp=$( (
  cat "$here/init" "$busybox"
  printf '%s\n' "${kos[@]}"
) | sha256sum | cut -c1-16)
initrd=$kdir/initrd-$stamp.img
if [[ ! -f $initrd ]]; then
  echo "prepare.sh: building $initrd" >&2
  work=$(mktemp -d "$kdir/initrd.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work"/{bin,dev,proc,sys,mnt,modules,hostjob}
  cp "$busybox" "$work/bin/busybox"
  ln -s busybox "$work/bin/sh"
  install -m 0755 "$here/init" "$work/init"
  i=0
  for ko in "${kos[@]}"; do
    # Numbered so that `for m in /modules/*` keeps the dependency order.
    cp "$ko" "$work/modules/$(printf '%02d' "$i")-$(basename "$ko")"
    i=$((i + 1))
  done
  echo "$kver" >"$work/kver"
  (cd "$work" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --quiet --owner=0:0 | gzip -9n) >"$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  rm -rf "$work"
  trap - EXIT
fi
# Images of other init scripts (older commits, other worktrees sharing the cache) may still be
# about to boot: remove only those unused for a week.
touch "$initrd"
find "$kdir" -maxdepth 1 -name 'initrd-*.img' -mtime +7 -delete

{
  echo "KVER=$kver"
  echo "VMLINUZ=$vmlinuz"
  echo "KERNEL=$kernel"
  echo "INITRD=$initrd"
  echo "MODROOT=$modroot"
} >"$cache/env.tmp"
mv "$cache/env.tmp" "$cache/env"
cat "$cache/env"
