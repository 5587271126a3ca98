#!/usr/bin/env bash
# The main job: a real multi-instance BlueMind migration in the network lab, end to end.
# Builds bmfleet, makes a 3-pair lab (network namespaces on a bridge in 198.18.0.0/24; per
# host one PostgreSQL cluster, sshd, Debian's Postfix and Cyrus IMAP, the BlueMind core
# stand-in; a sender host relaying the internet's mail; an orchestrator), enrolls every
# host's agent over SSH (bmctl fleet enroll: one-time join tokens), applies a fleet file with
# bmctl while mail is sent and IMAP clients act, follows `bmctl fleet status` to the end,
# prints a per-instance summary and mail line and tears the lab down. Exits 0 only if every
# instance is Done and verified (its mail too); the last line of output is one JSON object.
# Options go to `bmfleet-lab demo` (--pairs, --messages, --db-rows, --preinstalled to skip
# the enrollment, --stand-in-mail for the stand-in's mail).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --workspace --bins --locked
exec target/debug/bmfleet-lab demo "$@"
