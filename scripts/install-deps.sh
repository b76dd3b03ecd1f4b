#!/usr/bin/env bash
# System packages the sandbox, tests and demo need, on Debian/Ubuntu as root.
# Idempotent and quiet when everything is present (make calls it on every run).
set -euo pipefail

PACKAGES=(
  docker.io          # a real dockerd per simulated instance
  systemd-container  # systemd-nspawn for the e2e boot
  debootstrap        # the e2e rootfs
  cloud-init         # offline schema validation of generated user-data
  xfsprogs e2fsprogs util-linux  # mkfs, resize, blkid, losetup, fsfreeze
  busybox-static     # a registry-free docker image
  amazon-ec2-utils   # the udev rules EBS devices get on AL2023, read by tests
  libsystemd-dev pkg-config gcc python3-dev  # building systemd-python
  python3-venv
  iproute2 procps psmisc
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The loop driver may be a module on some kernels.
[[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || true
