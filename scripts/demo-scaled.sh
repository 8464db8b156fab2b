#!/usr/bin/env bash
# The whole stack of a real-time app on one machine, in one command:
#   Redis (broker) + PostgreSQL (history) + three room services + wsgate (config/scaled.yaml),
# then open http://127.0.0.1:8080/ in a few tabs, and http://127.0.0.1:8080/dashboard.
#
# Redis and PostgreSQL are started in a temporary directory when their programs are installed
# (Debian: apt-get install redis-server postgresql); without one, the services run without it
# and say so. Everything stops on Ctrl-C and the temporary directory is removed.
#
# Environment: WSGATE_BIN_DIR (default: build target/release with cargo), REDIS_PORT (6390),
# PG_PORT (5490), PG_USER (the unprivileged user PostgreSQL runs as when this runs as root;
# default postgres).
set -euo pipefail
cd "$(dirname "$0")/.."

redis_port=${REDIS_PORT:-6390}
pg_port=${PG_PORT:-5490}
work=$(mktemp -d -t wsgate-scaled.XXXXXX)
pids=()
pg_data=""
as_pg=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$pg_data" ]; then "${as_pg[@]}" "$pg_ctl" -D "$pg_data" -m fast stop >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${WSGATE_BIN_DIR:-}" ]; then
  bin=$WSGATE_BIN_DIR
else
  cargo build --release --locked --bins
  bin=${CARGO_TARGET_DIR:-target}/release
fi

wait_port() { # host port what
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "demo-scaled: $3 did not start on $1:$2" >&2
  return 1
}

service_flags=()
if command -v redis-server >/dev/null 2>&1; then
  redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
    --dir "$work" >"$work/redis.log" 2>&1 &
  pids+=($!)
  wait_port 127.0.0.1 "$redis_port" redis-server
  service_flags+=(--broker "redis://127.0.0.1:$redis_port")
  echo "demo-scaled: Redis on 127.0.0.1:$redis_port (rooms shared by the three services)"
else
  echo "demo-scaled: redis-server not installed: each service keeps its rooms to itself" >&2
fi

pg_bin=$(dirname "$(command -v initdb 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n1 || true)")
if [ -x "$pg_bin/initdb" ] && [ -x "$pg_bin/postgres" ]; then
  pg_ctl=$pg_bin/pg_ctl
  pg_data=$work/pg
  mkdir -p "$pg_data"
  if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses to run as root.
    chown "${PG_USER:-postgres}" "$work" "$pg_data"
    as_pg=(runuser -u "${PG_USER:-postgres}" --)
  fi
  "${as_pg[@]}" "$pg_bin/initdb" -D "$pg_data" -U wsgate --auth=trust -E UTF8 --no-sync >"$work/initdb.log" 2>&1
  "${as_pg[@]}" "$pg_ctl" -D "$pg_data" -l "$work/postgres.log" -w \
    -o "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$pg_data" start >/dev/null
  service_flags+=(--history "postgres://wsgate@127.0.0.1:$pg_port/postgres")
  echo "demo-scaled: PostgreSQL on 127.0.0.1:$pg_port (history shared, kept across restarts of the services)"
else
  echo "demo-scaled: PostgreSQL not installed: each service keeps its history in memory" >&2
fi

for i in 1 2 3; do
  "$bin/room-service" --listen "127.0.0.1:910$i" --name "room-service-$i" "${service_flags[@]}" &
  pids+=($!)
done
for i in 1 2 3; do wait_port 127.0.0.1 "910$i" "room-service-$i"; done

"$bin/wsgate" run -c config/scaled.yaml &
pids+=($!)
wait_port 127.0.0.1 8080 wsgate
echo "demo-scaled: open http://127.0.0.1:8080/ in a few tabs; numbers on http://127.0.0.1:8080/dashboard"
echo "demo-scaled: Ctrl-C stops everything"
wait "${pids[-1]}"
