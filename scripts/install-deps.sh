#!/usr/bin/env bash
# Installs the Debian packages Locus needs to build, run and test.
# Idempotent: packages already present are skipped. Needs root (or sudo).
set -euo pipefail

PKGS=(
  # build: bindgen for librocksdb-sys, fuser's libfuse3 linkage
  build-essential clang libclang-dev pkg-config libfuse3-dev librocksdb-dev
  # run: FUSE mounts, QEMU guests and images, NBD userspace clients
  fuse3 qemu-system-x86 qemu-utils libnbd-bin nbdkit fio genisoimage
  # tests: a client with a skewed clock
  faketime
  # tests: network namespaces, sqlite, rsync, git, busybox initramfs
  iproute2 sqlite3 rsync git busybox-static cpio procps psmisc
  # benchmarks: the peers we measure against side by side
  etcd-server etcd-client moosefs-master moosefs-chunkserver moosefs-client
  # bench: the etcd gRPC client is generated from .proto files
  protobuf-compiler libprotobuf-dev
)

find_missing() {
  missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}

find_missing
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The peers' own services must not start at install time: the benchmarks
# start private instances on loopback.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
# Installing one package can remove another that conflicts with its version
# (a backported qemu-utils goes when Debian's qemu-system-x86 comes): install
# what is missing again, at the versions the first round settled on.
find_missing
if [ ${#missing[@]} -ne 0 ]; then
  echo "install-deps: installing again ${missing[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
find_missing
if [ ${#missing[@]} -ne 0 ]; then
  echo "install-deps: still missing ${missing[*]}" >&2
  exit 1
fi
