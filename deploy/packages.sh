#!/usr/bin/env bash
# Builds the Debian packages bmfleet-agent, bmfleet-orchestrator and bmctl (cargo-deb) into
# target/debian/. PROFILE=dev packages the debug build (what the tests check, quickly);
# FAST=1 compresses less.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
PROFILE=${PROFILE:-release}
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0
cargo build --workspace --bins --locked --profile "$PROFILE"
case "$PROFILE" in dev) out=target/debug ;; *) out=target/$PROFILE ;; esac
mkdir -p target/completions
for shell in bash zsh fish; do
    "$out/bmctl" completions "$shell" > "target/completions/bmctl.$shell"
done
for package in bmfleet-agent bmfleet-orchestrator bmctl; do
    cargo deb --package "$package" --no-build --profile "$PROFILE" ${FAST:+--fast} --output target/debian
done
ls -l target/debian/*.deb
