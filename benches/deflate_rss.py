#!/usr/bin/env python3
"""RSS per idle compressed connection through a `compression: terminate` route.

    cargo build --release --bin wsgate --example bench_echo
    python3 benches/deflate_rss.py [--connections 9000]

For each mode (no compression; terminate without context takeover, the default; terminate
with context takeover both ways) it starts a fresh gateway in front of the benchmark echo
backend, then a separate client process (this script with --client) that opens N
connections offering permessage-deflate like a browser, sends one compressed chat-like message
on each and reads the echo (so any per-connection compression state exists), and then keeps
them all open and idle. The gateway's RSS before and after, divided by N, is the figure.
"""
import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
OFFER = "permessage-deflate; client_max_window_bits"
MESSAGE = json.dumps(
    {"room": "lobby", "user": "ada", "text": "hello everyone, how is the build going today?",
     "ts": 1733450000000, "tags": ["chat", "demo"]}
).encode() * 8


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")


def frame(opcode, payload, rsv1):
    head = bytes([0x80 | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader):
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0, await reader.readexactly(n)


async def one(port, path, deflate, held):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    ext = f"Sec-WebSocket-Extensions: {OFFER}\r\n" if deflate else ""
    writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n{ext}\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n")[0]:
        raise SystemExit(head.decode(errors="replace"))
    negotiated = b"permessage-deflate" in head.lower()
    if negotiated:
        # 11-bit window: what the gateway asks of clients that offer client_max_window_bits.
        c = zlib.compressobj(6, zlib.DEFLATED, -11)
        payload = c.compress(MESSAGE) + c.flush(zlib.Z_SYNC_FLUSH)
        writer.write(frame(1, payload[:-4], True))
    else:
        writer.write(frame(1, MESSAGE, False))
    await writer.drain()
    b0, payload = await read_frame(reader)
    if b0 & 0x40:
        d = zlib.decompressobj(-15)
        payload = d.decompress(payload + b"\x00\x00\xff\xff")
    assert payload == MESSAGE, "echo differs"
    held.append((reader, writer, negotiated))


async def client(port, path, n, deflate):
    held = []
    for start in range(0, n, 200):
        await asyncio.gather(*(one(port, path, deflate, held) for _ in range(min(200, n - start))))
    compressed = sum(1 for h in held if h[2])
    print(json.dumps({"open": len(held), "compressed": compressed}), flush=True)
    # Idle until told to stop (stdin closes).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def measure(n, mode):
    backend_port, gateway_port = free_port(), free_port()
    routes = {
        "plain": "    compression: strip\n",
        "terminate": "    compression: terminate\n",
        "takeover": ("    compression:\n      mode: terminate\n"
                     "      server_no_context_takeover: false\n"
                     "      client_no_context_takeover: false\n"),
    }
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    config.write(f"""listeners:
  - address: 127.0.0.1:{gateway_port}
upstreams:
  echo:
    backends:
      - ws://127.0.0.1:{backend_port}
routes:
  - name: echo
    upstream: echo
{routes[mode]}limits:
  max_connections: 20000
  compression_memory: 4GiB
""")
    config.close()
    procs = []
    try:
        procs.append(subprocess.Popen([os.path.join(RELEASE, "examples", "bench_echo"),
                                       f"127.0.0.1:{backend_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(backend_port)
        gw = subprocess.Popen([os.path.join(RELEASE, "wsgate"), "run", "-c", config.name],
                              env={**os.environ, "RUST_LOG": "warn"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(gw)
        wait_port(gateway_port)
        time.sleep(0.5)
        before = rss_kib(gw.pid)
        cl = subprocess.Popen([sys.executable, __file__, "--client", str(gateway_port),
                               "--connections", str(n), "--mode", mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(cl)
        report = json.loads(cl.stdout.readline())
        time.sleep(2)
        after = rss_kib(gw.pid)
        cl.stdin.close()
        per = (after - before) * 1024 / max(report["open"], 1)
        return {"mode": mode, **report, "rss_before_kib": before, "rss_after_kib": after,
                "bytes_per_connection": round(per)}
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait()
        os.unlink(config.name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=9000)
    ap.add_argument("--client", type=int)
    ap.add_argument("--mode", default="terminate")
    ap.add_argument("--modes", default="plain,terminate,takeover")
    args = ap.parse_args()
    if args.client:
        asyncio.run(client(args.client, "/", args.connections, args.mode != "plain"))
        return
    for mode in args.modes.split(","):
        print(json.dumps(measure(args.connections, mode)), flush=True)


if __name__ == "__main__":
    main()
