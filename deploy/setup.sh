#!/usr/bin/env bash
# Installs what bmfleet's build, tests and lab need on a Debian host (run as root).
# Idempotent: installs only the missing packages.
set -euo pipefail

packages=(
  rsync            # the data plane's transfer engine
  postgresql       # BlueMind's databases (bj, bj-data), dumped and restored for real
  iproute2         # ip netns / veth / bridge for the lab, service IP moves
  arping           # the lab's ARP checks, and the manual procedure's announcement in the bench
  openssh-server   # the lab hosts' sshd: enrollment and the manual procedure's transport
  openssh-client   # bmctl fleet enroll drives the system ssh (openssh crate)
  systemd          # systemd-analyze verify of the packaged units (not started here)
  procps
  attr             # setfattr/getfattr: the tests' extended attributes
  acl              # setfacl/getfacl: the tests' POSIX ACLs
  tzdata           # maintenance windows in IANA time zones
  prometheus       # promtool (rules, metrics checks) and a real Prometheus for the tests
  netplan.io       # netplan generate reads the service IP's netplan file on a lab target
  cyrus-imapd      # BlueMind's mail engine, real in the lab (its own mount namespace per host)
  postfix          # BlueMind's MTA, real in the lab (queue carried by the agent, a sender host)
  chromium-headless-shell  # Debian's headless Chromium: renders the migration report in a test
  fonts-liberation # the report's text in that browser (Chromium only recommends it)
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
  # No daemon of these packages starts on this host (the lab starts its own, in namespaces):
  # invoke-rc.d asks policy-rc.d, which refuses while the packages install.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # Postfix asks how it is used: local only (never started here: the lab runs its own, in
  # namespaces); its main.cf is what postmap reads when the tests rebuild maps.
  echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The tests start their own Prometheus, Cyrus and Postfix; none should keep running on its own.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus cyrus-imapd postfix >/dev/null 2>&1 || true
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

# cargo-deb builds the Debian packages (deploy/packages.sh); pinned, as its flags are.
if ! cargo deb --version 2>/dev/null | grep -q '3\.8\.0'; then
  echo "setup: installing cargo-deb 3.8.0"
  cargo install cargo-deb --locked --version 3.8.0 --quiet
fi

# A second PostgreSQL major for the cross-version tests: PostgreSQL 16 server binaries from
# the PyPI wheel `pgserver` (Debian 12 ships only 15), unpacked whole (its programs find their
# bundled libraries beside them), never on the PATH.
PGSERVER=/opt/bmfleet-test/pgserver
PG16=$PGSERVER/pgserver/pginstall
if ! "$PG16/bin/postgres" --version 2>/dev/null | grep -q ' 16\.'; then
  echo "setup: installing PostgreSQL 16 test binaries in $PG16 (PyPI pgserver 0.1.4)"
  python3 -m pip --version >/dev/null 2>&1 || {
    apt-get update -qq
    # Postfix asks how it is used: as nothing on this host (the lab runs its own, in namespaces).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-pip >/dev/null
  }
  wheel_dir=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 -d "$wheel_dir" pgserver==0.1.4
  rm -rf "$PGSERVER"
  mkdir -p "$PGSERVER"
  python3 -m zipfile -e "$wheel_dir"/pgserver-0.1.4-*.whl "$PGSERVER"
  chmod -R a+rX "$PGSERVER"
  chmod a+x "$PG16"/bin/*
  rm -rf "$wheel_dir"
fi
