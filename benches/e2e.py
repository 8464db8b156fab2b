#!/usr/bin/env python3
"""End-to-end benchmark: wsgate against direct, a blind TCP relay and nginx, on one machine.

    python3 benches/e2e.py            # full run: 4 repetitions, about 10 minutes
    python3 benches/e2e.py --quick    # 1 repetition, short windows, 2,000 idle connections
    python3 benches/e2e.py --forward  # a cluster's long-polling round trip, owner vs. forwarded
    python3 benches/e2e.py --targets wsgate,wsgate-terminate,nginx-node,wsgate-passthrough \
        --scenarios compressed,compressed-idle   # permessage-deflate at the edge

Every target runs pinned to core 0 (`taskset -c 0`); the echo backend and the load generator
share core 1, so every proxy figure is per proxy core. Targets:

  direct   the load generator talks to the echo backend itself (no proxy)
  tcp      benches/e2e/tcp_relay.rs: tokio copy_bidirectional, one thread, no protocol work
  nginx    the Debian nginx as a WebSocket proxy, one worker, access log off
  wsgate   `wsgate --threads 1 run`, parsing and re-masking every frame, logs at warn

and, when asked for with --targets, uring: benches/uring_relay, the blind relay on io_uring
instead of epoll (does another kernel interface make a proxy's work per message cheaper?), and
wsgate-hs256 / wsgate-rs256: wsgate with `auth.jwt` on the route, every upgrade carrying a
Bearer token (HS256 with a 48-byte secret, RS256 with a 2048-bit key, both made with openssl
for the run), so the handshake scenario shows what verifying a token costs:

    python3 benches/e2e.py --targets wsgate,wsgate-hs256,wsgate-rs256 --scenarios handshakes

The compressed scenarios (`compressed`: 1 KiB chat-like JSON text, 50 connections with 4 in
flight each; `compressed-idle`: RSS per idle connection after one compressed message) have the
load generator offer permessage-deflate as a browser does, against

  wsgate-terminate    `compression: terminate` in front of the echo backend, which has no
                      compression: the gateway inflates and deflates every message
  nginx-node          nginx in front of node `ws` compressing every message (threshold 0,
                      tests/autobahn/compression-backend, `npm ci` there first): the backend
                      pays for compression, nginx relays bytes
  wsgate-passthrough  `compression: passthrough` in front of the same node backend: the
                      gateway inflates a copy of each client message to count it
  wsgate              the default (`strip`): no compression, for the bytes on the wire

Scenarios are run for every target in turn, and the target order rotates between repetitions
(interleaved), each measurement on freshly started processes; the tables show medians. The
latency scenario is the exception: all targets run at once behind one backend and the load
generator interleaves their messages one by one, so a stall of the shared machine (the p99 is
made of them) falls on every target alike; each proxy's CPU is still its own. CPU time is user
+ system from /proc/PID/stat over the measured window. Raw results go to
target/e2e/results.json. Nothing here runs in CI.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
TARGETS = ["direct", "tcp", "nginx", "wsgate"]
DEFAULT_SCENARIOS = "small,large,latency,idle,handshakes"
URING_RELAY = os.path.join(RELEASE, "uring_relay")
# Targets whose backend is node `ws` with permessage-deflate instead of the echo backend.
NODE_BACKEND = {"nginx-node", "wsgate-passthrough"}
NODE_PEERS = os.path.join(ROOT, "tests", "autobahn", "compression-backend")
# wsgate targets with a route's `compression` mode.
COMPRESSION_TARGETS = {"wsgate-terminate": "terminate", "wsgate-passthrough": "passthrough"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CORE, CLIENT_CORE = "0", "1"
# Other work on a shared machine preempts the pinned processes and turns into latency
# outliers that belong to nobody's proxy; as root, every measured process (all targets alike)
# runs at a higher priority than that work.
PRIORITY = ["nice", "-n", "-10"] if os.geteuid() == 0 else []

NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 19500; multi_accept on; }}
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
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""

# The defaults a user gets, except the connection limit (the idle scenario holds 9,000
# connections, the default limit) and the access log, which nginx has off too.
WSGATE_CONF = """\
listeners:
  - address: 127.0.0.1:{port}
upstreams:
  backend:
    backends:
      - ws://127.0.0.1:{backend}
routes:
  - name: bench
    upstream: backend
limits:
  max_connections: 19000
"""

# Auth targets: the route's `auth` block (indented for the route) and how the token is signed.
AUTH_TARGETS = {
    "wsgate-hs256": ("HS256", "{{secret_file: {tmp}/hs.key, algorithms: [HS256]}}"),
    "wsgate-rs256": ("RS256", "{{pem: {tmp}/rsa_public.pem, algorithms: [RS256]}}"),
}


def b64url(data):
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(alg, tmp):
    """A token valid for a day, signed with the key made for this run."""
    import hashlib
    import hmac
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"sub": "bench", "exp": int(time.time()) + 86400}).encode())
    signing_input = f"{header}.{claims}".encode()
    if alg == "HS256":
        with open(os.path.join(tmp, "hs.key"), "rb") as f:
            signature = hmac.new(f.read(), signing_input, hashlib.sha256).digest()
    else:
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", os.path.join(tmp, "rsa_private.pem")],
            input=signing_input, capture_output=True, check=True).stdout
    return f"{header}.{claims}.{b64url(signature)}"


def make_keys(tmp):
    with open(os.path.join(tmp, "hs.key"), "wb") as f:
        f.write(os.urandom(48))
    private, public = os.path.join(tmp, "rsa_private.pem"), os.path.join(tmp, "rsa_public.pem")
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", private], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", private, "-pubout", "-out", public], check=True,
                   capture_output=True)


def scenarios(quick):
    short = dict(warmup=0.5, duration=2.0) if quick else dict(warmup=1.0, duration=5.0)
    return {
        "small": dict(kind="throughput", connections=100, size=64, window=32, **short),
        "large": dict(kind="throughput", connections=10, size=65536, window=4, **short),
        # The rate of each target: they run side by side, so the client core carries 10,000
        # messages/s in all (about half its capacity) when all four targets are measured.
        "latency": dict(kind="latency", connections=50, size=64, rate=2500, **short),
        "idle": dict(kind="idle", connections=2000 if quick else 9000, size=64, sources=60),
        "handshakes": dict(kind="handshakes", connections=128, size=64, **short),
        "compressed": dict(kind="throughput", connections=50, size=1024, window=4, deflate=True,
                           **short),
        "compressed-idle": dict(kind="idle", connections=2000 if quick else 9000, size=1024,
                                sources=60, deflate=True),
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


class Procs:
    """The processes of one measurement; stopped in reverse order."""

    def __init__(self, tmp):
        self.tmp, self.procs = tmp, []

    def start(self, name, core, argv, env=None):
        log = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        proc = subprocess.Popen(PRIORITY + ["taskset", "-c", core] + argv, stdout=log, stderr=log,
                                env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


def nginx_worker(master_pid, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{master_pid}/task/{master_pid}/children") as f:
                children = f.read().split()
            if children:
                return int(children[0])
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("nginx started no worker")


def start_target(procs, target, backend_port, tmp):
    """Starts `target`'s proxy in front of the backend; returns (port, proxy pid or None)."""
    if target == "direct":
        return backend_port, None
    proxy_port = free_port()
    if target == "uring":
        proxy = procs.start("uring", PROXY_CORE, [URING_RELAY, f"127.0.0.1:{proxy_port}",
                                                  f"127.0.0.1:{backend_port}"])
    elif target == "tcp":
        proxy = procs.start("tcp", PROXY_CORE, [f"{RELEASE}/examples/bench_tcp_relay",
                                                f"127.0.0.1:{proxy_port}",
                                                f"127.0.0.1:{backend_port}"])
    elif target in ("nginx", "nginx-node"):
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(tmp=tmp, backend=backend_port, port=proxy_port))
        proxy = procs.start("nginx", PROXY_CORE, ["nginx", "-p", tmp, "-c", conf, "-g", "daemon off;"])
    elif target.startswith("wsgate"):
        # "wsgate=PATH" runs another build beside this one (before/after comparisons).
        binary = target.split("=", 1)[1] if "=" in target else f"{RELEASE}/wsgate"
        conf = os.path.join(tmp, f"wsgate-{proxy_port}.yaml")
        text = WSGATE_CONF.format(backend=backend_port, port=proxy_port)
        if target in AUTH_TARGETS:
            key = AUTH_TARGETS[target][1].format(tmp=tmp)
            text = text.replace("    upstream: backend\n",
                                f"    upstream: backend\n    auth: {{jwt: {{keys: [{key}]}}}}\n")
        if target in COMPRESSION_TARGETS:
            text = text.replace("    upstream: backend\n", "    upstream: backend\n"
                                f"    compression: {COMPRESSION_TARGETS[target]}\n")
        with open(conf, "w") as f:
            f.write(text)
        env = dict(os.environ, RUST_LOG="warn")
        proxy = procs.start("wsgate", PROXY_CORE, [binary, "--threads", "1", "run", "-c", conf], env)
    else:
        raise RuntimeError(f"unknown target {target}")
    wait_listening(proxy_port, proxy)
    return proxy_port, nginx_worker(proxy.pid) if target.startswith("nginx") else proxy.pid


def measure(targets, name, sc, tmp):
    """One measurement on fresh processes: one target, or for `latency` all of them side by
    side behind one backend (the load generator interleaves their messages). Returns one
    result per target."""
    procs = Procs(tmp)
    backend_port = free_port()
    node = {t in NODE_BACKEND for t in targets}
    if len(node) > 1:
        raise RuntimeError(f"{targets} need different backends: measure them one by one")
    try:
        if node == {True}:
            backend = procs.start("backend", CLIENT_CORE,
                                  ["node", os.path.join(NODE_PEERS, "server.js"), str(backend_port),
                                   "--threshold", "0"])
        else:
            backend = procs.start("backend", CLIENT_CORE,
                                  [f"{RELEASE}/examples/bench_echo", f"127.0.0.1:{backend_port}"])
        wait_listening(backend_port, backend)
        started = [start_target(procs, target, backend_port, tmp) for target in targets]
        # The readiness probes connected without a handshake; let the proxies forget them.
        time.sleep(0.3)
        argv = [f"{RELEASE}/examples/loadgen", sc["kind"],
                "--target", ",".join(f"127.0.0.1:{port}" for port, _ in started),
                "--proxy-pid", ",".join(str(pid or 0) for _, pid in started),
                "--backend-pid", str(backend.pid)]
        for key in ("connections", "size", "window", "rate", "warmup", "duration", "sources"):
            if key in sc:
                argv += [f"--{key}", str(sc[key])]
        if sc.get("deflate"):
            argv.append("--deflate")
        auth = {AUTH_TARGETS[t][0] for t in targets if t in AUTH_TARGETS}
        if len(auth) > 1 or (auth and len(targets) > 1):
            raise RuntimeError("an auth target is measured on its own")
        for alg in auth:
            argv += ["--header", f"Authorization: Bearer {make_token(alg, tmp)}"]
        out = subprocess.run(PRIORITY + ["taskset", "-c", CLIENT_CORE] + argv, capture_output=True,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed against {targets} ({name}): {out.stderr.strip()}")
        result = json.loads(out.stdout)
        results = result["per_target"] if "per_target" in result else [result]
        for target, r in zip(targets, results):
            r["target"] = target
        return results
    finally:
        procs.stop()


def cpu(result, who):
    window = result.get("cpu") or {}
    ticks, seconds = window.get(f"{who}_ticks"), window.get("seconds")
    if ticks is None or not seconds:
        return None
    return ticks / CLK_TCK / seconds


def derived(result):
    """Per-measurement figures: CPU use of each side, messages per proxy CPU-second."""
    d = dict(result)
    for who in ("proxy", "backend", "loadgen"):
        d[f"{who}_cpu"] = cpu(result, who)
    window = result.get("cpu") or {}
    if d["proxy_cpu"] is not None and window.get("seconds") and d.get("messages"):
        proxy_seconds = window["proxy_ticks"] / CLK_TCK
        d["per_proxy_cpu_s"] = d["messages"] / proxy_seconds if proxy_seconds else None
    for who in ("proxy", "backend"):
        ticks = window.get(f"{who}_ticks")
        if ticks is not None and d.get("messages"):
            d[f"{who}_us_per_msg"] = ticks / CLK_TCK / d["messages"] * 1e6
    return d


def bottleneck(d):
    proxy, client = d.get("proxy_cpu"), (d.get("backend_cpu") or 0) + (d.get("loadgen_cpu") or 0)
    if proxy is not None and proxy >= 0.9:
        return "proxy core"
    if client >= 0.9:
        return "client core (loadgen + backend)"
    return "neither core saturated"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "n/a"
    if isinstance(v, float) and digits == 0 and abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:,.{max(digits, 2) if abs(v) < 100 else digits}f}"


def pct(v):
    return "n/a" if v is None else f"{v * 100:.0f} %"


def ratio(a, b):
    return None if a is None or not b else a / b


def report(results, args, elapsed):
    by = {}
    for r in results:
        by.setdefault((r["scenario_name"], r["target"]), []).append(derived(r))

    def med(name, target, key):
        return median([r.get(key) for r in by.get((name, target), [])])

    lines = []
    machine = machine_line()
    reps = args.reps
    lines.append(f"Machine: {machine}")
    lines.append(f"Command: `python3 benches/e2e.py{' --quick' if args.quick else ''}"
                 f"{f' --reps {reps}' if reps != default_reps(args.quick, args.target_list) else ''}"
                 f"{f' --targets {args.targets}' if args.target_list != TARGETS else ''}"
                 f"{f' --scenarios {args.scenarios}' if args.scenarios != DEFAULT_SCENARIOS else ''}`, "
                 f"{reps} repetition(s), medians, {elapsed / 60:.1f} min")
    lines.append("")
    compressed_report(by, args, lines)
    if not any(name in by_name(by) for name in DEFAULT_SCENARIOS.split(",")):
        return "\n".join(lines + verified_line(results))
    lines.append("| check | wsgate | vs nginx | vs TCP relay | target | met |")
    lines.append("| --- | --- | --- | --- | --- | --- |")

    def row(check, value, vs_nginx, vs_tcp, target, met):
        lines.append(f"| {check} | {value} | {fmt(vs_nginx, 2)}x | {fmt(vs_tcp, 2)}x | {target} | "
                     f"{'n/a' if met is None else ('yes' if met else 'NO')} |")

    w = lambda n, k: med(n, "wsgate", k)
    ng = lambda n, k: med(n, "nginx", k)
    tc = lambda n, k: med(n, "tcp", k)
    r_ = ratio(w("small", "per_proxy_cpu_s"), ng("small", "per_proxy_cpu_s"))
    row("64 B msgs per proxy CPU-second", fmt(w("small", "per_proxy_cpu_s")), r_,
        ratio(w("small", "per_proxy_cpu_s"), tc("small", "per_proxy_cpu_s")), "≥ 1.1x nginx",
        None if r_ is None else r_ >= 1.1)
    row("64 B msgs/s", fmt(w("small", "msgs_per_s")),
        ratio(w("small", "msgs_per_s"), ng("small", "msgs_per_s")),
        ratio(w("small", "msgs_per_s"), tc("small", "msgs_per_s")), "", None)
    r_ = ratio(w("large", "msgs_per_s"), tc("large", "msgs_per_s"))
    row("64 KiB msgs/s", fmt(w("large", "msgs_per_s")),
        ratio(w("large", "msgs_per_s"), ng("large", "msgs_per_s")), r_, "≥ 0.95x TCP relay",
        None if r_ is None else r_ >= 0.95)
    row("64 KiB msgs per proxy CPU-second", fmt(w("large", "per_proxy_cpu_s")),
        ratio(w("large", "per_proxy_cpu_s"), ng("large", "per_proxy_cpu_s")),
        ratio(w("large", "per_proxy_cpu_s"), tc("large", "per_proxy_cpu_s")), "", None)
    for p, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        r_ = ratio(w("latency", p), ng("latency", p))
        row(f"latency {label} at {scenarios(args.quick)['latency']['rate']:,} msgs/s, side by side (µs)",
            fmt(w("latency", p)), r_, ratio(w("latency", p), tc("latency", p)),
            "≤ 1.0x nginx" if p == "p99_us" else "",
            (None if r_ is None else r_ <= 1.0) if p == "p99_us" else None)
    kib = lambda v: None if v is None else v / 1024
    wi = kib(w("idle", "proxy_bytes_per_conn"))
    row(f"RSS per idle proxied connection (KiB, {scenarios(args.quick)['idle']['connections']:,})",
        fmt(wi, 2), ratio(wi, kib(ng("idle", "proxy_bytes_per_conn"))),
        ratio(wi, kib(tc("idle", "proxy_bytes_per_conn"))), "≤ 4 KiB",
        None if wi is None else wi <= 4.0)
    r_ = ratio(w("handshakes", "msgs_per_s"), ng("handshakes", "msgs_per_s"))
    row("handshakes/s (connect, upgrade, close)", fmt(w("handshakes", "msgs_per_s")), r_,
        ratio(w("handshakes", "msgs_per_s"), tc("handshakes", "msgs_per_s")), "≥ 1.0x nginx",
        None if r_ is None else r_ >= 1.0)
    row("handshakes per proxy CPU-second", fmt(w("handshakes", "per_proxy_cpu_s")),
        ratio(w("handshakes", "per_proxy_cpu_s"), ng("handshakes", "per_proxy_cpu_s")),
        ratio(w("handshakes", "per_proxy_cpu_s"), tc("handshakes", "per_proxy_cpu_s")), "", None)
    if wi is not None:
        lines.append("")
        lines.append(f"At {wi:.2f} KiB per idle connection, one million idle WebSockets through "
                     f"wsgate need about {wi * 1e6 / 1024 / 1024:.1f} GiB of gateway memory "
                     f"(plus 2 million sockets' kernel memory and file descriptors).")

    lines.append("")
    lines.append("| scenario | target | msgs/s | msgs per proxy CPU-s | proxy CPU | backend CPU | "
                 "loadgen CPU | bottleneck |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    names = {"small": "64 B × 100 conns, 32 in flight each", "large": "64 KiB × 10 conns, 4 in flight",
             "latency": "fixed rate, side by side (latency)", "handshakes": "handshakes, 128 at once"}
    for name in ("small", "large", "latency", "handshakes"):
        for target in args.target_list:
            rows = by.get((name, target))
            if not rows:
                continue
            m = lambda k: median([r.get(k) for r in rows])
            bn = bottleneck({k: m(k) for k in ("proxy_cpu", "backend_cpu", "loadgen_cpu")})
            if name == "latency":
                bn = f"p50/p99/p99.9 {fmt(m('p50_us'))}/{fmt(m('p99_us'))}/{fmt(m('p999_us'))} µs"
            lines.append(f"| {names[name]} | {target} | {fmt(m('msgs_per_s'))} | "
                         f"{fmt(m('per_proxy_cpu_s'))} | {pct(m('proxy_cpu'))} | "
                         f"{pct(m('backend_cpu'))} | {pct(m('loadgen_cpu'))} | {bn} |")
    lines.append("")
    lines.append("| idle connections | target | proxy RSS per connection | backend RSS per connection | ramp-up |")
    lines.append("| --- | --- | --- | --- | --- |")
    for target in args.target_list:
        rows = by.get(("idle", target))
        if not rows:
            continue
        m = lambda k: median([r.get(k) for r in rows])
        lines.append(f"| {m('connections'):,.0f} | {target} | "
                     f"{fmt(kib(m('proxy_bytes_per_conn')), 2)} KiB | "
                     f"{fmt(kib(m('backend_bytes_per_conn')), 2)} KiB | {fmt(m('ramp_seconds'), 1)} s |")
    pairs = {}
    for r in results:
        if r["scenario_name"] == "latency" and r["target"] in ("wsgate", "nginx"):
            pairs.setdefault(r["rep"], {})[r["target"]] = r["p99_us"]
    pairs = [p for _, p in sorted(pairs.items()) if len(p) == 2]
    if pairs:
        per_rep = ", ".join(f"{p['wsgate']:,}/{p['nginx']:,}" for p in pairs)
        lines.append("")
        lines.append(f"Latency p99 per repetition, wsgate/nginx side by side (µs): {per_rep}; "
                     f"wsgate lower in {sum(p['wsgate'] <= p['nginx'] for p in pairs)} of "
                     f"{len(pairs)}, median ratio "
                     f"{fmt(median([p['wsgate'] / p['nginx'] for p in pairs if p['nginx']]), 2)}x.")
    auth_rows = [t for t in AUTH_TARGETS if (("handshakes", t) in by)]
    if auth_rows and ("handshakes", "wsgate") in by:
        plain = med("handshakes", "wsgate", "per_proxy_cpu_s")
        lines.append("")
        lines.append("| handshakes with a token check | handshakes/s | per proxy CPU-second | "
                     "proxy CPU per handshake | added by the check |")
        lines.append("| --- | --- | --- | --- | --- |")
        for target in ["wsgate"] + auth_rows:
            per_cpu = med("handshakes", target, "per_proxy_cpu_s")
            cost = None if not per_cpu else 1e6 / per_cpu
            added = None if not per_cpu or not plain else 1e6 / per_cpu - 1e6 / plain
            label = "none" if target == "wsgate" else AUTH_TARGETS[target][0]
            lines.append(f"| {label} | {fmt(med('handshakes', target, 'msgs_per_s'))} | "
                         f"{fmt(per_cpu)} | {fmt(cost, 1)} µs | "
                         f"{'' if target == 'wsgate' else fmt(added, 1) + ' µs'} |")
    return "\n".join(lines + verified_line(results))


def by_name(by):
    return {name for name, _ in by}


def verified_line(results):
    verified = sum(r.get("verified", 0) or 0 for r in results)
    return ["", f"Echoes verified byte for byte: {verified:,}; failures: 0 (any failure aborts the "
                "run)."]


def compressed_report(by, args, lines):
    """The permessage-deflate tables: per round trip of a 1 KiB chat message, and idle RSS."""
    def m(name, target, key):
        return median([r.get(key) for r in by.get((name, target), [])])
    rows = [t for t in args.target_list if ("compressed", t) in by]
    if rows:
        lines.append("| compressed 1 KiB chat JSON (50 conns, 4 in flight) | msgs/s | "
                     "msgs per proxy CPU-s | proxy CPU per msg | backend CPU per msg | "
                     "proxy + backend per msg | client wire bytes per round trip | compressed |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for t in rows:
            proxy, backend = m("compressed", t, "proxy_us_per_msg"), m("compressed", t, "backend_us_per_msg")
            both = None if proxy is None or backend is None else proxy + backend
            conns = m("compressed", t, "compressed_connections")
            lines.append(f"| {t} | {fmt(m('compressed', t, 'msgs_per_s'))} | "
                         f"{fmt(m('compressed', t, 'per_proxy_cpu_s'))} | {fmt(proxy, 1)} µs | "
                         f"{fmt(backend, 1)} µs | {fmt(both, 1)} µs | "
                         f"{fmt(m('compressed', t, 'wire_bytes_per_round_trip'))} | "
                         f"{'yes' if conns else 'no'} |")
        lines.append("")
    rows = [t for t in args.target_list if ("compressed-idle", t) in by]
    if rows:
        count = scenarios(args.quick)["compressed-idle"]["connections"]
        lines.append(f"| idle after one compressed message ({count:,} conns) | proxy RSS per "
                     "connection | backend RSS per connection | connections compressed |")
        lines.append("| --- | --- | --- | --- |")
        for t in rows:
            kib = lambda v: None if v is None else v / 1024
            lines.append(f"| {t} | {fmt(kib(m('compressed-idle', t, 'proxy_bytes_per_conn')), 2)} KiB | "
                         f"{fmt(kib(m('compressed-idle', t, 'backend_bytes_per_conn')), 2)} KiB | "
                         f"{int(m('compressed-idle', t, 'compressed_connections') or 0):,} |")
        lines.append("")


def default_reps(quick, targets):
    """At least three repetitions, and at least one per target: the order rotates every
    repetition, so each target then runs once in every position. On a shared virtual machine the
    position matters (the first measurement after a pause is often the fastest), and a median
    over positions cancels it."""
    return 1 if quick else max(3, len(targets))


def machine_line():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    kernel = os.uname().release
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return f"{os.cpu_count()} × {model}, {mem:.0f} GiB, Linux {kernel}, {nginx.replace('nginx version: ', '')}"


# Two instances of one cluster for the forward scenario: the session is opened on gw-1 (the
# owner); round trips go to gw-1 itself or to gw-2, which forwards them over the peer hop.
FORWARD_CONF = """\
listeners:
  - {{name: clients, address: "127.0.0.1:{client}"}}
  - {{name: peers, address: "127.0.0.1:{peer}"}}
upstreams:
  echo:
    backends: [ "ws://127.0.0.1:{backend}" ]
routes:
  - {{name: echo, upstream: echo}}
cluster:
  name: {name}
  secret: bench-cluster-secret-0123456789abcdef
  listener: peers
  peers:
    - {{name: gw-1, address: "127.0.0.1:{peer1}"}}
    - {{name: gw-2, address: "127.0.0.1:{peer2}"}}
"""


def proc_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def forward_scenario(args):
    """A long-polling round trip (send one message, poll its echo) on the owner instance vs.
    through another instance that forwards both requests to the owner. Keep-alive client
    connections; both instances pinned to core 0 with one thread each, the echo backend and
    this client on core 1. Blocks of round trips alternate between the two paths, so a stall
    of the shared machine falls on both."""
    import http.client
    rounds, blocks = (300, 4) if args.quick else (2000, 6)
    tmp = tempfile.mkdtemp(prefix="wsgate-forward-")
    procs = Procs(tmp)
    try:
        backend_port = free_port()
        backend = procs.start("backend", CLIENT_CORE,
                              [f"{RELEASE}/examples/bench_echo", f"127.0.0.1:{backend_port}"])
        wait_listening(backend_port, backend)
        ports = [(free_port(), free_port()) for _ in range(2)]
        pids = []
        for i, (client, peer) in enumerate(ports):
            conf = os.path.join(tmp, f"gw-{i + 1}.yaml")
            with open(conf, "w") as f:
                f.write(FORWARD_CONF.format(client=client, peer=peer, backend=backend_port,
                                            name=f"gw-{i + 1}", peer1=ports[0][1], peer2=ports[1][1]))
            proc = procs.start(f"gw-{i + 1}", PROXY_CORE,
                               [f"{RELEASE}/wsgate", "--threads", "1", "run", "-c", conf],
                               dict(os.environ, RUST_LOG="warn"))
            wait_listening(client, proc)
            pids.append(proc.pid)
        owner = http.client.HTTPConnection("127.0.0.1", ports[0][0])
        owner.request("POST", "/?wsgate=open", body=b"")
        sid = json.loads(owner.getresponse().read())["session"]
        paths = {"owner": owner, "forwarded": http.client.HTTPConnection("127.0.0.1", ports[1][0])}
        state = {"seq": 0, "ack": 0}

        def round_trip(conn):
            state["seq"] += 1
            body = json.dumps({"seq": state["seq"], "messages": [{"text": "x" * 64}]})
            conn.request("POST", f"/?wsgate=send&wsgate_sid={sid}", body=body)
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200, answer.status
            while state["ack"] < state["seq"]:
                conn.request("GET", f"/?wsgate=poll&wsgate_sid={sid}&wsgate_ack={state['ack']}")
                answer = conn.getresponse()
                events = json.loads(answer.read())["events"]
                if events:
                    state["ack"] = events[-1]["seq"]

        samples = {name: [] for name in paths}
        cpu = {name: 0 for name in paths}
        for name, conn in paths.items():
            for _ in range(50):
                round_trip(conn)
        for block in range(blocks):
            for name, conn in (list(paths.items()) if block % 2 == 0 else list(paths.items())[::-1]):
                before = sum(proc_ticks(pid) for pid in pids)
                for _ in range(rounds):
                    started = time.perf_counter()
                    round_trip(conn)
                    samples[name].append((time.perf_counter() - started) * 1e6)
                cpu[name] += sum(proc_ticks(pid) for pid in pids) - before
        print(f"\nLong-polling round trip (send 64 B + poll its echo), {blocks * rounds} per path, "
              f"keep-alive client; {machine_line()}\n")
        print("| path | median µs | p99 µs | gateway CPU per round trip (µs, both instances) |")
        print("| --- | ---: | ---: | ---: |")
        for name in paths:
            values = sorted(samples[name])
            p99 = values[int(len(values) * 0.99) - 1]
            per = cpu[name] / CLK_TCK / len(values) * 1e6
            print(f"| {name} | {statistics.median(values):.0f} | {p99:.0f} | {per:.0f} |")
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS)
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--forward", action="store_true",
                        help="only the cluster scenario: a long-polling round trip on the owner "
                             "instance vs. forwarded through a peer")
    args = parser.parse_args()
    if args.forward:
        if not args.no_build:
            subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "wsgate",
                            "--example", "bench_echo"], cwd=ROOT, check=True)
        forward_scenario(args)
        return
    targets = args.target_list = args.targets.split(",")
    args.reps = args.reps or default_reps(args.quick, targets)
    if os.cpu_count() < 2:
        sys.exit("needs two cores: the proxy on core 0, load generator and backend on core 1")
    if any(t in NODE_BACKEND for t in targets) and not os.path.isdir(
            os.path.join(NODE_PEERS, "node_modules")):
        sys.exit("node `ws` not installed: npm ci --prefix tests/autobahn/compression-backend")
    if any(t.startswith("nginx") for t in targets) and not shutil.which("nginx"):
        sys.exit("nginx not found: apt-get install nginx-light (or leave it out with --targets)")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "wsgate",
                        "--example", "loadgen", "--example", "bench_echo",
                        "--example", "bench_tcp_relay"], cwd=ROOT, check=True)
        if "uring" in targets:
            subprocess.run(["cargo", "build", "--release", "--locked", "--manifest-path",
                            os.path.join(ROOT, "benches", "uring_relay", "Cargo.toml"),
                            "--target-dir", os.path.join(ROOT, "target")], check=True)
    all_scenarios = scenarios(args.quick)
    chosen = args.scenarios.split(",")
    started = time.time()
    results = []
    tmp = tempfile.mkdtemp(prefix="wsgate-e2e-")
    if any(t in AUTH_TARGETS for t in targets):
        make_keys(tmp)
    try:
        for rep in range(args.reps):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            for name in chosen:
                sc = all_scenarios[name]
                side_by_side = [t for t in order if t not in AUTH_TARGETS and t not in NODE_BACKEND]
                groups = [side_by_side] if name == "latency" else [[t] for t in order]
                for group in groups:
                    if name in ("idle", "compressed-idle") and group == ["direct"]:
                        continue
                    for result in measure(group, name, sc, tmp):
                        result["scenario_name"], result["rep"] = name, rep
                        results.append(result)
                        d = derived(result)
                        summary = (f"p99 {d.get('p99_us')} µs" if name == "latency" else
                                   f"{(d.get('proxy_bytes_per_conn') or 0) / 1024:.2f} KiB/conn"
                                   if name.endswith("idle") else
                                   f"{fmt(d.get('msgs_per_s'))}/s, proxy CPU {pct(d.get('proxy_cpu'))}")
                        print(f"[rep {rep + 1}/{args.reps}] {name:<10} {result['target']:<6} {summary}",
                              file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out_dir = os.path.join(ROOT, "target", "e2e")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(report(results, args, time.time() - started))


if __name__ == "__main__":
    main()
