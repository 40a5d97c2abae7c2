"""The auth policy endpoint: before-auth check latency and throughput, and
what it costs a login through a real Dovecot 2.3.

    python -m bench.policy [--seconds 5] [--concurrency 64] [--rounds 3] [--no-doc]

1. ``command=allow`` at 64 concurrent kept-alive connections against a real
   `lastlogin serve` (PostgreSQL, 200 rules loaded, none matching), with the
   same asyncio client against a floor server (a fixed answer, no parsing,
   no decision) in the same run: the ratio is what lastlogin adds.
2. IMAP logins through Dovecot 2.3 (no post-login step, so only the policy
   client differs) with auth_policy_server_url pointing at lastlogin versus
   not set, interleaved round by round; every failure is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import threading
import time

from app.db import make_engine
from app.db.migrate import upgrade
from app.db.rules import add_rule
from bench.doc import write_section
from tests.harness.daemon import make_daemon
from tests.harness.dovecot import make_dovecot, policy_config
from tests.harness.mailclients import imap_login_ok
from tests.harness.pg import free_port, start_server

KEY = "bench-policy-key"
BODY = json.dumps({"login": "user@example.com", "pwhash": "0a1", "remote": "198.51.100.7",
                   "local": "127.0.0.1", "protocol": "imap", "session_id": "s1",
                   "tls": False}).encode()
REQUEST = (b"POST /?command=allow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + KEY.encode()
           + b"\r\nContent-Type: application/json\r\nContent-Length: "
           + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
FLOOR_ANSWER = (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                b'Content-Length: 24\r\n\r\n{"status": 0, "msg": ""}')


async def _floor_conn(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(FLOOR_ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _client(port: int, seconds: float, concurrency: int) -> tuple[list[float], int]:
    lat: list[float] = []
    bad = 0
    stop = time.perf_counter() + seconds

    async def worker():
        nonlocal bad
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            if not head.startswith(b"HTTP/1.1 200") or b'"status": 0' not in body:
                bad += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat, bad


def _stats(lat: list[float], seconds: float) -> dict[str, float]:
    q = statistics.quantiles(lat, n=100)
    return {"p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "per_s": len(lat) / seconds}


async def _floor_run(seconds: float, concurrency: int):
    port = free_port()
    server = await asyncio.start_server(_floor_conn, "127.0.0.1", port)
    try:
        return await _client(port, seconds, concurrency)
    finally:
        server.close()


def _logins(port: int, seconds: float, threads: int, users: list[str]) -> tuple[int, int]:
    ok = failed = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(user):
        nonlocal ok, failed
        while time.monotonic() < stop:
            good = imap_login_ok(port, user)
            with lock:
                ok += good
                failed += not good

    ts = [threading.Thread(target=run, args=(u,)) for u in users[:threads]]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return ok, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--login-threads", type=int, default=8)
    ap.add_argument("--no-doc", action="store_true", help="print only")
    args = ap.parse_args()

    import sqlalchemy as sa
    pg = start_server()
    admin = sa.create_engine(pg.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql("CREATE DATABASE bench_policy")
    admin.dispose()
    url = pg.url("bench_policy")
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        for i in range(200):
            add_rule(conn, action="deny", remote_network=f"10.{i // 250}.{i % 250}.0/24",
                     comment="bench")
    port = free_port()
    daemon = make_daemon(url, protocols="imap,pop3", policy_listen=f"127.0.0.1:{port}",
                         policy_api_key=KEY, log_level="warning")
    daemon.start()
    lines: list[str] = []
    try:
        checks = {"floor": [], "lastlogin": []}
        for _ in range(args.rounds):
            for name in ("floor", "lastlogin"):
                lat, bad = (asyncio.run(_floor_run(args.seconds, args.concurrency))
                            if name == "floor" else
                            asyncio.run(_client(port, args.seconds, args.concurrency)))
                assert bad == 0, f"{name}: {bad} answers were not allow"
                checks[name].append(_stats(lat, args.seconds))
        med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for n, rs in checks.items()}

        # through Dovecot: policy on vs off, interleaved
        users = [f"u{i}" for i in range(args.login_threads)]
        dovecot_runs = {"policy off": [], "policy on": []}
        for _ in range(args.rounds):
            for mode in dovecot_runs:
                dc = make_dovecot(daemon.socket_dir)
                dc.mode = "none"
                dc.mail_debug = False
                dc.extra = policy_config(port, KEY) if mode == "policy on" else ""
                for u in users:
                    dc.add_user(u.encode())
                dc.start()
                try:
                    ok, failed = _logins(dc.imap_port, args.seconds, args.login_threads, users)
                finally:
                    dc.stop()
                assert failed == 0, f"{mode}: {failed} logins failed"
                dovecot_runs[mode].append(ok / args.seconds)
        dmed = {m: statistics.median(v) for m, v in dovecot_runs.items()}
    finally:
        daemon.stop()
        engine.dispose()
        pg.stop()

    ll, fl = med["lastlogin"], med["floor"]
    lines += [
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"median of {args.rounds} rounds of {args.seconds:g} s; `python -m bench.policy`.",
        "",
        f"Before-auth check (`command=allow`), {args.concurrency} concurrent kept-alive "
        "connections, 200 rules loaded:",
        "",
        "| server | p50 ms | p99 ms | checks/s |",
        "|---|---|---|---|",
        f"| floor (fixed answer, same client) | {fl['p50_ms']:.2f} | {fl['p99_ms']:.2f} | "
        f"{fl['per_s']:,.0f} |",
        f"| lastlogin | {ll['p50_ms']:.2f} | {ll['p99_ms']:.2f} | {ll['per_s']:,.0f} |",
        f"| ratio lastlogin / floor | {ll['p50_ms'] / fl['p50_ms']:.2f} | "
        f"{ll['p99_ms'] / fl['p99_ms']:.2f} | {ll['per_s'] / fl['per_s']:.2f} |",
        "",
        f"IMAP logins through Dovecot 2.3 ({args.login_threads} clients, no post-login):",
        "",
        "| Dovecot | logins/s | relative |",
        "|---|---|---|",
        f"| policy off | {dmed['policy off']:,.0f} | 1.00 |",
        f"| policy on (lastlogin) | {dmed['policy on']:,.0f} | "
        f"{dmed['policy on'] / dmed['policy off']:.2f} |",
    ]
    if args.no_doc:
        print("\n".join(lines))
    else:
        write_section("POLICY", "The auth policy endpoint", lines)


if __name__ == "__main__":
    main()
