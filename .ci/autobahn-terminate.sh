#!/usr/bin/env bash
# Autobahn|Testsuite permessage-deflate cases (12.*, 13.*) through wsgate with
# `compression: terminate`, in front of the tokio-tungstenite echo backend
# (examples/echo_backend.rs), which has no compression at all: the gateway negotiates deflate
# with the suite, inflates what it sends and deflates the echoes. Every case must be OK; fails
# if any case is worse than the committed baseline tests/autobahn/expected-terminate.json.
#
#   .ci/autobahn-terminate.sh [REPORT_DIR]     # ~8 min
set -euo pipefail
cd "$(dirname "$0")/.."
reports="${1:-target/autobahn-terminate-reports}"

autobahn=""
for dir in "${AUTOBAHN_DIR:-}" ../shared/tools/autobahn /work/shared/tools/autobahn; do
  if [ -n "$dir" ] && [ -x "$dir/run.sh" ]; then autobahn="$dir"; break; fi
done
if [ -z "$autobahn" ]; then
  echo "autobahn-terminate: ../shared/tools/autobahn not found (set AUTOBAHN_DIR)." >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  echo "autobahn-terminate: SKIPPED (not in CI)" >&2
  exit 0
fi

"$autobahn/setup.sh" >/dev/null
cargo build --release --locked --bin wsgate --example echo_backend

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 100); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "autobahn-terminate: nothing listens on 127.0.0.1:$1" >&2
  return 1
}

pids=()
config=$(mktemp --suffix .yaml)
# The configuration goes once the gateway is gone: it watches the file and would report it missing.
trap 'kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; rm -f "$config"' EXIT

backend_port=$(free_port)
gateway_port=$(free_port)
target/release/examples/echo_backend "127.0.0.1:$backend_port" 2>/dev/null &
pids+=($!)
wait_port "$backend_port"
# Autobahn's 12.*/13.* messages reach 128 KiB; 9.* is not run here.
cat >"$config" <<EOF
listeners:
  - address: 127.0.0.1:$gateway_port
upstreams:
  echo:
    backends:
      - ws://127.0.0.1:$backend_port
routes:
  - name: echo
    upstream: echo
    compression: terminate
EOF
RUST_LOG=warn target/release/wsgate run -c "$config" &
pids+=($!)
wait_port "$gateway_port"

status=0
"$autobahn/run.sh" --timeout 1500 --agent wsgate-terminate "ws://127.0.0.1:$gateway_port" '12.*,13.*' "$reports" || status=$?
python3 .ci/autobahn-compare.py autobahn-terminate "$reports/summary.json" tests/autobahn/expected-terminate.json || status=1
exit $status
