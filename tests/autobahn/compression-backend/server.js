'use strict';
// A permessage-deflate echo server: node `ws` (pinned in package.json), an implementation
// independent of wsgate's codec. Used as the backend of .ci/autobahn-compression.sh
// (Autobahn 12.*/13.* through the gateway) and of tests/compression.rs.
//
//   node server.js [PORT] [--threshold BYTES] [--exit-with-stdin]
//
// Listens on 127.0.0.1:PORT (0, the default, lets the OS choose) and prints one line
// `listening PORT` when ready. Then, for every connection, one JSON line on stdout:
// {"offer": <the request's Sec-WebSocket-Extensions or null>, "negotiated": <what ws accepted>}.
// Text and binary messages are echoed with the opcode they came with.
//
// permessage-deflate is enabled with ws's defaults (as in the Autobahn validation of ws
// 8.23.0 in ../shared/tools/autobahn): messages under 1024 bytes are sent uncompressed.
// `--threshold 0` compresses every message, for tests that want RSV1 on everything.
// `--exit-with-stdin` exits when stdin ends, so a test that dies cannot leave the server behind
// (not for a shell's background job, whose stdin is /dev/null).
const { WebSocketServer } = require('ws');

const args = process.argv.slice(2);
let port = 0;
let threshold;
let exitWithStdin = false;
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--threshold') {
    threshold = parseInt(args[++i], 10);
  } else if (args[i] === '--exit-with-stdin') {
    exitWithStdin = true;
  } else {
    port = parseInt(args[i], 10);
  }
}
const perMessageDeflate = threshold === undefined ? true : { threshold };

const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate }, () => {
  console.log(`listening ${wss.address().port}`);
});
wss.on('connection', (ws, request) => {
  console.log(JSON.stringify({
    offer: request.headers['sec-websocket-extensions'] ?? null,
    negotiated: ws.extensions,
  }));
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => {});
});
if (exitWithStdin) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.resume();
}
