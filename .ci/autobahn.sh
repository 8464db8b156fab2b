#!/usr/bin/env bash
# Autobahn|Testsuite conformance of wsgate in front of an independent echo backend
# (tokio-tungstenite, examples/echo_backend.rs). Cases 1-10 (12.*/13.* are permessage-deflate,
# which that backend does not implement). Fails if any case FAILED, or if any case is worse
# than the committed baseline tests/autobahn/expected.json (e.g. OK -> NON-STRICT).
#
#   .ci/autobahn.sh [REPORT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
reports="${1:-target/autobahn-reports}"

autobahn=""
for dir in "${AUTOBAHN_DIR:-}" ../shared/tools/autobahn /work/shared/tools/autobahn; do
  if [ -n "$dir" ] && [ -x "$dir/run.sh" ]; then autobahn="$dir"; break; fi
done
if [ -z "$autobahn" ]; then
  echo "autobahn: ../shared/tools/autobahn not found (set AUTOBAHN_DIR)." >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  echo "autobahn: SKIPPED (not in CI)" >&2
  exit 0
fi

"$autobahn/setup.sh" >/dev/null
cargo build --release --locked --bin wsgate --example echo_backend

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend_port=$(free_port)
gateway_port=$(free_port)
target/release/examples/echo_backend "127.0.0.1:$backend_port" 2>/dev/null &
backend_pid=$!
RUST_LOG=warn target/release/wsgate proxy --listen "127.0.0.1:$gateway_port" --to "ws://127.0.0.1:$backend_port" &
gateway_pid=$!
trap 'kill $gateway_pid $backend_pid 2>/dev/null || true' EXIT

for _ in $(seq 100); do
  if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$gateway_port),0.2)" 2>/dev/null; then break; fi
  sleep 0.1
done

status=0
"$autobahn/run.sh" --no-compression --timeout 900 --agent wsgate "ws://127.0.0.1:$gateway_port" '*' "$reports" || status=$?

python3 .ci/autobahn-compare.py autobahn "$reports/summary.json" tests/autobahn/expected.json || status=1
exit $status
