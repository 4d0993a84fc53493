#!/usr/bin/env bash
# Builds, once, the tiny Linux guest the qemu driver tests boot: Debian's
# cloud kernel (from the linux-image-cloud-amd64 package) and a busybox-static
# initramfs. Both are cached under $LOCUS_GUEST_CACHE (default
# $HOME/.cache/locus/guest); later runs reuse them without the network.
# LOCUS_GUEST_REFRESH=1 fetches the current kernel again.
#
# Prints two lines on stdout:
#   kernel=/path/to/vmlinuz
#   initrd=/path/to/initrd.cpio.gz
#
# The guest's /init understands these kernel command-line parameters:
#   locus.sleep=N      sleep N seconds before ending (default 0)
#   locus.end=poweroff (default) power off; `panic`: /init exits, so the
#                      kernel panics (the qemu driver reports Failed)
#   locus.token=WORD   written with the disk marker, so a test knows the run
# It prints LOCUS-GUEST-UP on the console, writes "LOCUS-DISK <dev> <token>"
# at the start of every /dev/vd* disk (and prints LOCUS-DISK-WRITTEN <dev> or
# LOCUS-DISK-WRITE-FAILED <dev>), and powers off when the ACPI power button is
# pressed (QMP system_powerdown) or when it is done.
set -euo pipefail

CACHE="${LOCUS_GUEST_CACHE:-$HOME/.cache/locus/guest}"
mkdir -p "$CACHE"
# Tests run in parallel: one builder at a time, the others wait and reuse.
exec 9>"$CACHE/.lock"
flock -w 900 9

log() { echo "test-kernel: $*" >&2; }
scratch=()
trap 'rm -rf "${scratch[@]}"' EXIT

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Kernel modules the guest needs, in load order (dependencies first). The
# cloud kernel builds these as modules and ships no modules.dep we could use
# without kmod.
MODULES=(
  drivers/virtio/virtio_ring drivers/virtio/virtio
  drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev
  drivers/virtio/virtio_pci drivers/block/virtio_blk
  drivers/misc/pvpanic/pvpanic drivers/misc/pvpanic/pvpanic-mmio
  drivers/input/evdev drivers/acpi/button
)

INIT_SCRIPT='#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules); do insmod "/lib/modules/$m.ko" 2>/dev/null; done

SLEEP=0
END=poweroff
TOKEN=none
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    locus.sleep=*) SLEEP="${arg#locus.sleep=}" ;;
    locus.end=*) END="${arg#locus.end=}" ;;
    locus.token=*) TOKEN="${arg#locus.token=}" ;;
  esac
done

# QMP system_powerdown presses the ACPI power button: power off on any event
# from it (evdev reads whole 24-byte events; a shorter read fails).
button=""
for ev in /sys/class/input/event*; do
  if grep -q "Power Button" "$ev/device/name" 2>/dev/null; then
    button="/dev/input/${ev##*/}"
  fi
done
if [ -n "$button" ]; then
  # Opened here, before LOCUS-GUEST-UP: a press right after it is not lost.
  exec 3<"$button"
  echo "LOCUS-POWER-BUTTON $button"
  (dd of=/dev/null bs=24 count=1 <&3 2>/dev/null &&
    echo LOCUS-GUEST-POWERDOWN && poweroff -f) &
else
  echo "LOCUS-NO-POWER-BUTTON: $(cat /sys/class/input/*/name 2>/dev/null | tr "\n" " ")"
fi

echo LOCUS-GUEST-UP

for dev in /dev/vd?; do
  [ -b "$dev" ] || continue
  if printf "LOCUS-DISK %s %s\n" "${dev##*/}" "$TOKEN" | dd of="$dev" conv=fsync 2>/dev/null; then
    echo "LOCUS-DISK-WRITTEN ${dev##*/}"
  else
    echo "LOCUS-DISK-WRITE-FAILED ${dev##*/}"
  fi
done

sleep "$SLEEP"
echo "LOCUS-GUEST-END $END"
if [ "$END" = panic ]; then
  exit 1
fi
poweroff -f
'

current="$CACHE/current"
if [ -z "${LOCUS_GUEST_REFRESH:-}" ] && [ -f "$current" ]; then
  kver="$(cat "$current")"
else
  work="$(mktemp -d)"
  scratch+=("$work")
  cd "$work"
  # The unversioned package only depends on the current versioned one.
  if ! apt-get download linux-image-cloud-amd64 >/dev/null 2>&1; then
    log "apt-get download failed; updating the package lists"
    $SUDO apt-get update -qq
    apt-get download linux-image-cloud-amd64 >/dev/null 2>&1
  fi
  pkg="$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' |
    sed -n 's/^ *\(linux-image-[^ ]*-cloud-amd64\).*/\1/p' | head -n1)"
  [ -n "$pkg" ] || { log "cannot find the kernel package linux-image-cloud-amd64 depends on"; exit 1; }
  kver="${pkg#linux-image-}"
  if [ ! -f "$CACHE/vmlinuz-$kver" ] || [ ! -d "$CACHE/modules-$kver" ]; then
    log "fetching $pkg"
    apt-get download "$pkg" >/dev/null 2>&1
    dpkg -x "$pkg"_*.deb root
    rm -rf "$CACHE/modules-$kver.tmp"
    mkdir -p "$CACHE/modules-$kver.tmp"
    for m in "${MODULES[@]}"; do
      src="root/lib/modules/$kver/kernel/$m.ko"
      # A module may be built in on another kernel version: skip it then.
      if [ -f "$src" ]; then
        cp "$src" "$CACHE/modules-$kver.tmp/"
      fi
    done
    rm -rf "$CACHE/modules-$kver"
    mv "$CACHE/modules-$kver.tmp" "$CACHE/modules-$kver"
    cp "root/boot/vmlinuz-$kver" "$CACHE/vmlinuz-$kver.tmp"
    mv "$CACHE/vmlinuz-$kver.tmp" "$CACHE/vmlinuz-$kver"
  fi
  echo "$kver" >"$current.tmp"
  mv "$current.tmp" "$current"
fi

kernel="$CACHE/vmlinuz-$kver"
[ -f "$kernel" ] || { log "cached kernel $kernel is missing; run with LOCUS_GUEST_REFRESH=1"; exit 1; }

# The initramfs is named by the kernel version and a hash of what goes in it,
# so a change to /init or the module list builds a new one.
# The guest has no libc: busybox must be the static build (busybox-static).
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && { ldd "$b" 2>&1 || true; } | grep -q 'not a dynamic executable'; then
    busybox="$b"
    break
  fi
done
[ -n "$busybox" ] || { log "no static busybox: install busybox-static (scripts/install-deps.sh)"; exit 1; }
hash="$( (echo "$INIT_SCRIPT"; printf '%s\n' "${MODULES[@]}"; sha256sum "$busybox") | sha256sum | cut -c1-16)"
initrd="$CACHE/initrd-$kver-$hash.cpio.gz"
if [ ! -f "$initrd" ]; then
  log "building $initrd"
  tree="$(mktemp -d)"
  scratch+=("$tree")
  mkdir -p "$tree"/{bin,dev,proc,sys,etc,lib/modules}
  cp "$busybox" "$tree/bin/busybox"
  printf '%s' "$INIT_SCRIPT" >"$tree/init"
  chmod 755 "$tree/init" "$tree/bin/busybox"
  : >"$tree/etc/modules"
  for m in "${MODULES[@]}"; do
    name="${m##*/}"
    if [ -f "$CACHE/modules-$kver/$name.ko" ]; then
      cp "$CACHE/modules-$kver/$name.ko" "$tree/lib/modules/"
      echo "$name" >>"$tree/etc/modules"
    fi
  done
  (cd "$tree" && find . -print0 | cpio --null -o -H newc --quiet | gzip -9) >"$initrd.tmp"
  mv "$initrd.tmp" "$initrd"
  # Older builds (another /init, another kernel) are not used any more.
  find "$CACHE" -maxdepth 1 -name 'initrd-*.cpio.gz' ! -name "${initrd##*/}" -delete
fi

echo "kernel=$kernel"
echo "initrd=$initrd"
