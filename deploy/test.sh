#!/usr/bin/env bash
# The test command: installs what the tests need, then checks format and lints, builds the
# binaries the end-to-end tests start, and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
cargo test --workspace --locked
