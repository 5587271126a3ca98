#!/usr/bin/env bash
# The main job, for now: a fresh fleet PKI, an orchestrator and two agents (an origin and a
# target host, simulated on loopback with their own data_root and a real PostgreSQL cluster
# each), then `bmctl fleet status`. Everything it starts is stopped and removed on exit.
# (It becomes the multi-host lab migration demo once the lab exists.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --workspace --bins --locked
bin="$PWD/target/debug"

work=$(mktemp -d /tmp/bmfleet-demo.XXXXXX)
chmod 755 "$work"
pids=()
pgdata=()
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for d in "${pgdata[@]}"; do runuser -u postgres -- "$pgbin/pg_ctl" -D "$d" -m fast stop >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# A free loopback port at or above $1.
free_port() {
  local p=$1
  while ss -Hltn "sport = :$p" | grep -q .; do p=$((p + 1)); done
  echo "$p"
}

echo "== fleet PKI"
"$bin/bmctl" fleet pki init --dir "$work/pki"
"$bin/bmctl" fleet pki issue --dir "$work/pki" --name orchestrator --role orchestrator --ip 127.0.0.1
"$bin/bmctl" fleet pki issue --dir "$work/pki" --name origin-1 --role agent --ip 127.0.0.1
"$bin/bmctl" fleet pki issue --dir "$work/pki" --name target-1 --role agent --ip 127.0.0.1
"$bin/bmctl" fleet pki issue --dir "$work/pki" --name operator --role operator

port=$(free_port 17400)
orch_port=$port
agent_conf=""
for host in origin-1 target-1; do
  root="$work/hosts/$host"
  mkdir -p "$root/etc/bm" "$root/var/spool/cyrus/data/user/alice" "$root/pg/run"
  # BlueMind stand-in: the bm-core package version, and one message in the spool.
  echo "5.1.2-demo" > "$root/etc/bm/bm-core.version"
  printf 'Subject: hello\r\n\r\nfrom %s\r\n' "$host" > "$root/var/spool/cyrus/data/user/alice/1."

  echo "== $host: PostgreSQL cluster"
  chown -R postgres: "$root/pg"
  runuser -u postgres -- "$pgbin/initdb" -D "$root/pg/data" -A trust --no-sync >/dev/null
  pg_port=$(free_port $((port + 1)))
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$root/pg/data" -l "$root/pg/log" -w \
    -o "-p $pg_port -k $root/pg/run -c listen_addresses=''" start >/dev/null
  pgdata+=("$root/pg/data")

  agent_port=$(free_port $((pg_port + 1)))
  port=$agent_port
  cat > "$work/$host.toml" <<CONF
listen = "127.0.0.1:$agent_port"
data_root = "$root"
state_dir = "$root/var/lib/bmfleet-agent"
[tls]
ca = "$work/pki/ca.pem"
cert = "$work/pki/$host.pem"
key = "$work/pki/$host-key.pem"
[facts]
bluemind_version_command = ["cat", "$root/etc/bm/bm-core.version"]
postgresql_version_command = ["runuser", "-u", "postgres", "--", "psql", "-h", "$root/pg/run", "-p", "$pg_port", "-XAtc", "SHOW server_version"]
spool_users = ["postgres"]
[[services.service]]
name = "bluemind"
start = ["true"]
stop = ["true"]
status = ["true"]
CONF
  "$bin/bmfleet-agent" --config "$work/$host.toml" 2> "$work/$host.log" &
  pids+=($!)
  agent_conf+=$'\n'"[[agent]]"$'\n'"name = \"$host\""$'\n'"address = \"127.0.0.1:$agent_port\""
done

cat > "$work/orchestrator.toml" <<CONF
listen = "127.0.0.1:$orch_port"
state_db = "$work/orchestrator/state.db"
health_interval_secs = 1
[tls]
ca = "$work/pki/ca.pem"
cert = "$work/pki/orchestrator.pem"
key = "$work/pki/orchestrator-key.pem"
$agent_conf
CONF
echo "== orchestrator on 127.0.0.1:$orch_port"
"$bin/bmfleet-orchestrator" --config "$work/orchestrator.toml" 2> "$work/orchestrator.log" &
pids+=($!)

export BMFLEET_ORCHESTRATOR="127.0.0.1:$orch_port" BMFLEET_CA="$work/pki/ca.pem" \
  BMFLEET_CERT="$work/pki/operator.pem" BMFLEET_KEY="$work/pki/operator-key.pem"
for _ in $(seq 1 60); do
  up=$("$bin/bmctl" fleet status --output json 2>/dev/null | grep -c '"up": true' || true)
  [ "$up" = 2 ] && break
  sleep 0.5
done

echo "== bmctl fleet status"
"$bin/bmctl" fleet status
if [ "$up" != 2 ]; then
  echo "demo: not every agent came up; logs:" >&2
  tail -n 20 "$work"/*.log >&2
  exit 1
fi

echo "== an agent's certificate may not use the Fleet API (expected refusal)"
if BMFLEET_CERT="$work/pki/origin-1.pem" BMFLEET_KEY="$work/pki/origin-1-key.pem" \
  "$bin/bmctl" fleet status; then
  echo "demo: the Fleet API accepted an agent certificate" >&2
  exit 1
fi
echo "== audit log"
"$bin/bmctl" fleet audit
