#!/usr/bin/env bash
# Autobahn|Testsuite permessage-deflate cases (12.*, 13.*) through wsgate with
# `compression: passthrough`, in front of a compressing echo backend: node `ws` 8.23.0 with
# perMessageDeflate (tests/autobahn/compression-backend/server.js, the configuration validated in
# ../shared/tools/autobahn). The gateway relays compressed frames as opaque payload, so every
# case must come out as it does against the backend alone. Fails if any case FAILED, or if any
# case is worse than the committed baseline tests/autobahn/expected-compression.json
# (e.g. OK -> UNIMPLEMENTED, which is what a gateway stripping the offer would give).
#
#   .ci/autobahn-compression.sh [REPORT_DIR]            # through the gateway (~8 min)
#   .ci/autobahn-compression.sh --direct [REPORT_DIR]   # the backend alone, for comparison
#
# Needs node (>= 18) and npm; installs the pinned `ws` into tests/autobahn/compression-backend
# (`npm ci`) if it is not there.
set -euo pipefail
cd "$(dirname "$0")/.."
direct=false
if [ "${1:-}" = "--direct" ]; then
  direct=true
  shift
fi
reports="${1:-target/autobahn-compression-reports}"
peers=tests/autobahn/compression-backend

skip_or_fail() {
  echo "autobahn-compression: $1" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  echo "autobahn-compression: SKIPPED (not in CI)" >&2
  exit 0
}

autobahn=""
for dir in "${AUTOBAHN_DIR:-}" ../shared/tools/autobahn /work/shared/tools/autobahn; do
  if [ -n "$dir" ] && [ -x "$dir/run.sh" ]; then autobahn="$dir"; break; fi
done
[ -n "$autobahn" ] || skip_or_fail "../shared/tools/autobahn not found (set AUTOBAHN_DIR)."
command -v node >/dev/null 2>&1 || skip_or_fail "node is not on PATH (node >= 18 and npm needed)."
if [ ! -f "$peers/node_modules/ws/package.json" ]; then
  npm ci --prefix "$peers" --no-audit --no-fund
fi

"$autobahn/setup.sh" >/dev/null
# The same selection as the other Autobahn scripts: with the example, dev-dependencies join the
# feature resolution, and the release build they made is reused instead of made again.
$direct || cargo build --release --locked --bin wsgate --example echo_backend

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 100); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "autobahn-compression: nothing listens on 127.0.0.1:$1" >&2
  return 1
}

pids=()
config=$(mktemp --suffix .yaml)
# The configuration goes once the gateway is gone: it watches the file and would report it missing.
trap 'kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; rm -f "$config"' EXIT

backend_port=$(free_port)
node "$peers/server.js" "$backend_port" >/dev/null &
pids+=($!)
wait_port "$backend_port"

if $direct; then
  agent=ws-deflate-direct
  url="ws://127.0.0.1:$backend_port"
else
  agent=wsgate-deflate
  gateway_port=$(free_port)
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
    compression: passthrough
EOF
  RUST_LOG=warn target/release/wsgate run -c "$config" &
  pids+=($!)
  wait_port "$gateway_port"
  url="ws://127.0.0.1:$gateway_port"
fi

status=0
"$autobahn/run.sh" --timeout 1500 --agent "$agent" "$url" '12.*,13.*' "$reports" || status=$?
if $direct; then exit $status; fi

python3 .ci/autobahn-compare.py autobahn-compression "$reports/summary.json" tests/autobahn/expected-compression.json || status=1
exit $status
