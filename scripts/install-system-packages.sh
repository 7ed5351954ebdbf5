#!/usr/bin/env bash
# Install the Debian 12 packages that Esplanade's demo, tests and benchmarks need.
# Idempotent and quick when everything is present: apt runs only for what is missing.
set -euo pipefail

PACKAGES=(
  # build and run
  python3-venv python3-dev gcc make libssl-dev libc6-dev linux-libc-dev procps
  # the state store (tests start their own etcd on free loopback ports)
  etcd-server etcd-client
  # the interop peer: strongSwan 5.9.8 with kernel-libipsec (userspace ESP over TUN)
  strongswan-charon strongswan-swanctl strongswan-pki
  libcharon-extra-plugins libstrongswan-extra-plugins libstrongswan-standard-plugins
  # test traffic and captures
  iproute2 iputils-ping iperf3 tcpdump ethtool nftables curl
  # kernel ESP is proven inside a qemu VM (this kernel has no ESP)
  qemu-system-x86 kmod busybox-static
  # AddressSanitizer fuzzing of the compiled hot loop
  clang libclang-rt-14-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "install-system-packages: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi
