#!/usr/bin/env bash
# Installs what bmfleet's build, tests and lab need on a Debian host (run as root).
# Idempotent: installs only the missing packages.
set -euo pipefail

packages=(
  rsync            # the data plane's transfer engine
  postgresql       # BlueMind's databases (bj, bj-data), dumped and restored for real
  iproute2         # ip netns / veth / bridge for the lab, service IP moves
  arping           # gratuitous ARP after the service IP moves
  openssh-server   # the manual procedure's transport, for the side-by-side benchmark
  openssh-client
  procps
  attr             # setfattr/getfattr: the tests' extended attributes
  acl              # setfacl/getfacl: the tests' POSIX ACLs
  tzdata           # maintenance windows in IANA time zones
  prometheus       # promtool (rules, metrics checks) and a real Prometheus for the tests
  gcc              # rusqlite builds SQLite from source
  libc6-dev
  pkg-config
  ca-certificates
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The tests start their own Prometheus; none should keep running on its own.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: no Rust toolchain found: install one with rustup (Rust 1.85 or newer)" >&2
  exit 1
fi
