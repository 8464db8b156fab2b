#!/usr/bin/env python3
"""A permessage-deflate client for tests/compression.rs: Python `websockets` (its own deflate,
zlib through the standard library).

    python3 websockets_client.py URL

Connects offering permessage-deflate (websockets' default offer), sends a fixed set of
messages one at a time and checks each comes back identical with the same type, then closes
with 1000. Prints one JSON line: {"extensions": [names negotiated], "response_extensions":
<Sec-WebSocket-Extensions of the 101 or null>, "results": [{"name", "ok"}], "close": code}.
Exits 0 only if every message came back intact.
"""
import json
import os
import sys

from websockets.sync.client import connect

url = sys.argv[1]
prose = "Größe: 10 €, naïve café, 寿司 and 🍣 — permessage-deflate through a gateway. "
cases = [
    ("short text", "hello"),
    ("empty text", ""),
    ("compressible text 256 KiB", prose * (262144 // len(prose.encode()) + 1)),
    ("compressible binary 1 MiB", b"a" * (1 << 20)),
    ("random binary 64 KiB", os.urandom(65536)),
    ("chat json", json.dumps({"room": "lobby", "user": "ada", "text": prose}) * 4),
]
results = []
with connect(url, max_size=None, open_timeout=10, close_timeout=10) as ws:
    names = [type(e).__name__ for e in ws.protocol.extensions]
    header = ws.response.headers.get("Sec-WebSocket-Extensions")
    for name, data in cases:
        ws.send(data)
        got = ws.recv(timeout=20)
        results.append({"name": name, "ok": type(got) is type(data) and got == data})
    ws.close(1000, "done")
    close = ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None
print(json.dumps({"extensions": names, "response_extensions": header, "results": results,
                  "close": close}))
sys.exit(0 if all(r["ok"] for r in results) else 1)
