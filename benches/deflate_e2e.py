#!/usr/bin/env python3
"""Compressed end-to-end scenario: chat-like 1 KiB JSON messages, the client negotiating
permessage-deflate, through

  wsgate-terminate    wsgate `compression: terminate` in front of benches/e2e's echo backend,
                      which has no compression: the gateway inflates and deflates
  nginx-node          nginx (one worker) in front of node `ws` with perMessageDeflate, every
                      message compressed (tests/autobahn/compression-backend/server.js): the
                      backend pays for compression, nginx relays bytes
  wsgate-passthrough  wsgate `compression: passthrough` in front of the same node backend:
                      the gateway only inflates a copy to count it against the limits
  wsgate-strip        wsgate `compression: strip` in front of the plain echo: no compression,
                      for the wire size

    cargo build --release --bin wsgate --example bench_echo
    npm ci --prefix tests/autobahn/compression-backend
    python3 benches/deflate_e2e.py [--seconds 10] [--connections 50]

The proxy is pinned to core 0, everything else to core 1. The client (this script, Python
asyncio, each connection one message at a time) compresses every message afresh (valid under
any agreement) and inflates replies with one inflater per connection (valid with or without
the server's context takeover). Reported per target: messages per second, messages per proxy
CPU-second (user + system from /proc over the window), the backend's CPU share, and bytes on
the client's wire per round trip (frame headers and payloads both ways). Nothing here runs in
CI; the client, not the proxy, limits the rate.
"""
import argparse
import asyncio
import base64
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
NODE_PEERS = os.path.join(ROOT, "tests", "autobahn", "compression-backend")
CLK_TCK = os.sysconf("SC_CLK_TCK")
OFFER = "permessage-deflate; client_max_window_bits"

NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 19500; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream backend {{ server 127.0.0.1:{backend}; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_buffering off;
        }}
    }}
}}
"""


def chat_messages(n=64):
    rng = random.Random(7)
    words = ("hello there, the build is green again; shall we ship it before lunch or wait for "
             "the review? the dashboard shows latency flat and memory fine").split()
    out = []
    for i in range(n):
        items = []
        while len(json.dumps(items)) < 1000:
            items.append({"id": 10_000 + i * 31 + len(items), "user": f"user{rng.randrange(40)}",
                          "room": "lobby", "ts": 1_733_450_000_000 + rng.randrange(10**6),
                          "text": " ".join(rng.choice(words) for _ in range(8))})
        out.append(json.dumps(items)[:1024].encode())
    return out


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port):
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def nginx_worker(master):
    for _ in range(100):
        out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
        if out.split():
            return int(out.split()[0])
        time.sleep(0.05)
    raise SystemExit("no nginx worker")


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
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


async def read_message(reader, counts):
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    extra = 0
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
        extra = 2
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
        extra = 8
    payload = await reader.readexactly(n)
    counts["wire"] += 2 + extra + n
    return b0, payload


async def connection(port, messages, stop, counts):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {OFFER}\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    deflate = b"permessage-deflate" in head.lower()
    inflater = zlib.decompressobj(-15)
    i = random.randrange(len(messages))
    while not stop.is_set():
        message = messages[i % len(messages)]
        i += 1
        if deflate:
            # A 9-bit window is within whatever either server answers (wsgate asks for 11).
            c = zlib.compressobj(6, zlib.DEFLATED, -9)
            payload = (c.compress(message) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
        else:
            payload = message
        data = frame(1, payload, deflate)
        writer.write(data)
        counts["wire"] += len(data)
        await writer.drain()
        b0, reply = await read_message(reader, counts)
        if b0 & 0x40:
            reply = inflater.decompress(reply + b"\x00\x00\xff\xff")
        if reply != message:
            raise SystemExit("echo differs")
        counts["messages"] += 1
        counts["compressed"] += bool(deflate)
    writer.close()


def run_client(port, connections, seconds, warmup):
    async def main():
        messages = chat_messages()
        stop = asyncio.Event()
        counts = {"messages": 0, "wire": 0, "compressed": 0}
        tasks = [asyncio.create_task(connection(port, messages, stop, counts))
                 for _ in range(connections)]
        await asyncio.sleep(warmup)
        start = dict(counts)
        print(json.dumps({"phase": "start"}), flush=True)
        await asyncio.sleep(seconds)
        end = dict(counts)
        print(json.dumps({"phase": "end", "messages": end["messages"] - start["messages"],
                          "wire": end["wire"] - start["wire"],
                          "compressed": end["compressed"] > 0}), flush=True)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.run(main())


def measure(target, args, tmp):
    procs = []
    try:
        backend_port, proxy_port = free_port(), free_port()
        if target in ("nginx-node", "wsgate-passthrough"):
            backend = subprocess.Popen(["taskset", "-c", "1", "node", "server.js", str(backend_port),
                                        "--threshold", "0"], cwd=NODE_PEERS,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            backend = subprocess.Popen(["taskset", "-c", "1", os.path.join(RELEASE, "examples", "bench_echo"),
                                        f"127.0.0.1:{backend_port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(backend)
        wait_port(backend_port)
        if target == "nginx-node":
            conf = os.path.join(tmp, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(tmp=tmp, backend=backend_port, port=proxy_port))
            master = subprocess.Popen(["taskset", "-c", "0", "nginx", "-p", tmp, "-c", conf,
                                       "-g", "daemon off;"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(master)
            wait_port(proxy_port)
            proxy_pid = nginx_worker(master.pid)
        else:
            mode = target.split("-", 1)[1]
            conf = os.path.join(tmp, "wsgate.yaml")
            with open(conf, "w") as f:
                f.write(f"listeners:\n  - address: 127.0.0.1:{proxy_port}\nupstreams:\n  b:\n"
                        f"    backends:\n      - ws://127.0.0.1:{backend_port}\nroutes:\n"
                        f"  - name: bench\n    upstream: b\n    compression: {mode}\n")
            gw = subprocess.Popen(["taskset", "-c", "0", os.path.join(RELEASE, "wsgate"),
                                   "--threads", "1", "run", "-c", conf],
                                  env={**os.environ, "RUST_LOG": "warn"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(gw)
            wait_port(proxy_port)
            proxy_pid = gw.pid
        client = subprocess.Popen(["taskset", "-c", "1", sys.executable, __file__, "--client",
                                   str(proxy_port), "--connections", str(args.connections),
                                   "--seconds", str(args.seconds)],
                                  stdout=subprocess.PIPE, text=True)
        procs.append(client)
        json.loads(client.stdout.readline())
        t0, p0, b0 = time.monotonic(), ticks(proxy_pid), ticks(backend.pid)
        report = json.loads(client.stdout.readline())
        t1, p1, b1 = time.monotonic(), ticks(proxy_pid), ticks(backend.pid)
        client.wait(timeout=30)
        seconds = t1 - t0
        proxy_cpu = (p1 - p0) / CLK_TCK
        return {
            "target": target,
            "msgs_per_s": round(report["messages"] / seconds),
            "msgs_per_proxy_cpu_s": round(report["messages"] / proxy_cpu) if proxy_cpu else None,
            "proxy_cpu": round(proxy_cpu / seconds, 3),
            "backend_cpu": round((b1 - b0) / CLK_TCK / seconds, 3),
            "client_wire_bytes_per_round_trip": round(report["wire"] / max(report["messages"], 1)),
            "compressed": report["compressed"],
        }
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="wsgate-terminate,nginx-node,wsgate-passthrough,wsgate-strip")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--client", type=int)
    args = ap.parse_args()
    if args.client:
        run_client(args.client, args.connections, args.seconds, warmup=2)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            print(json.dumps(measure(target, args, tmp)), flush=True)


if __name__ == "__main__":
    main()
