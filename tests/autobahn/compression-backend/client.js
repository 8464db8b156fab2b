'use strict';
// A permessage-deflate client for tests/compression.rs: node `ws` (pinned in package.json).
//
//   node client.js URL [--no-deflate]
//
// Connects to URL offering permessage-deflate (unless --no-deflate), with a compression
// threshold of 0 so every message it sends is compressed when the extension is negotiated.
// Sends a fixed set of messages one at a time (compressible and incompressible, text with
// multi-byte characters, empty, large, and compressed messages fragmented into several frames),
// checks that each comes back identical, with the same opcode, then closes with 1000.
// Prints one JSON line on stdout:
//   {"extensions": <Sec-WebSocket-Extensions of the 101, or null>,
//    "results": [{"name", "bytes", "ok", "error"?}, ...],
//    "payload_bytes": <sum of the messages' sizes, both ways>,
//    "wire_bytes": <bytes read + written on the TCP connection, HTTP heads included>,
//    "close": <close code received>}
// and exits 0 only if every message came back intact. Cuts itself after 30 s.
const WebSocket = require('ws');
const crypto = require('crypto');

const url = process.argv[2];
const deflate = !process.argv.includes('--no-deflate');
setTimeout(() => fail('timed out after 30 s'), 30000).unref();

function fail(message) {
  process.stderr.write(`client.js: ${message}\n`);
  process.exit(2);
}

// Compressible text with 2-, 3- and 4-byte UTF-8 characters.
const prose = 'Größe: 10 €, naïve café, 寿司 and 🍣 — permessage-deflate through a gateway. ';
const cases = [
  { name: 'short text', data: 'hello' },
  { name: 'empty text', data: '' },
  { name: 'compressible text 256 KiB', data: prose.repeat(Math.ceil(262144 / Buffer.byteLength(prose))) },
  { name: 'compressible binary 1 MiB', data: Buffer.alloc(1 << 20, 0x61), binary: true },
  { name: 'random binary 64 KiB', data: crypto.randomBytes(65536), binary: true },
  // A compressed message in three frames: RSV1 on the first only (RFC 7692 §6.1); the frames
  // split a 4-byte character of the uncompressed text.
  { name: 'fragmented compressed text', fragments: ['🍣 first part ' + prose.repeat(50), 'second ' + prose.repeat(50), ' end 🍣'] },
  { name: 'fragmented compressed binary', fragments: [Buffer.alloc(40000, 1), Buffer.alloc(40000, 2)], binary: true },
  // Context takeover: the same text again compresses to almost nothing.
  { name: 'compressible text again', data: prose.repeat(100) },
];

const ws = new WebSocket(url, { perMessageDeflate: deflate ? { threshold: 0 } : false });
let extensions = null;
let socket = null;
ws.on('upgrade', (response) => {
  extensions = response.headers['sec-websocket-extensions'] ?? null;
  socket = response.socket;
});
ws.on('unexpected-response', (_request, response) => fail(`HTTP ${response.statusCode} instead of 101`));
ws.on('error', (error) => fail(`error: ${error.message}`));

const results = [];
let payloadBytes = 0;
let pending = null;
ws.on('message', (data, isBinary) => {
  if (!pending) fail('a message nobody asked for');
  const { resolve } = pending;
  pending = null;
  resolve({ data, isBinary });
});

function expected(c) {
  if (c.fragments) {
    return c.binary ? Buffer.concat(c.fragments) : Buffer.from(c.fragments.join(''));
  }
  return Buffer.isBuffer(c.data) ? c.data : Buffer.from(c.data);
}

async function run() {
  for (const c of cases) {
    const echoed = new Promise((resolve) => { pending = { resolve }; });
    if (c.fragments) {
      c.fragments.forEach((part, i) => {
        ws.send(part, { binary: !!c.binary, fin: i === c.fragments.length - 1, compress: true });
      });
    } else {
      ws.send(c.data, { binary: !!c.binary, compress: true });
    }
    const { data, isBinary } = await echoed;
    const want = expected(c);
    payloadBytes += 2 * want.length;
    const result = { name: c.name, bytes: want.length, ok: true };
    if (isBinary !== !!c.binary) {
      Object.assign(result, { ok: false, error: `came back as ${isBinary ? 'binary' : 'text'}` });
    } else if (!want.equals(data)) {
      Object.assign(result, { ok: false, error: `came back different (${data.length} bytes)` });
    }
    results.push(result);
  }
  const closed = new Promise((resolve) => ws.on('close', (code) => resolve(code)));
  ws.close(1000, 'done');
  const close = await closed;
  const wireBytes = socket ? socket.bytesRead + socket.bytesWritten : null;
  console.log(JSON.stringify({ extensions, results, payload_bytes: payloadBytes, wire_bytes: wireBytes, close }));
  process.exit(results.every((r) => r.ok) ? 0 : 1);
}

ws.on('open', () => run().catch((error) => fail(error.stack)));
