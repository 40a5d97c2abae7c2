"""The auth policy endpoint: before-auth check latency and throughput, and
what it costs a login through a real Dovecot 2.3.

    python -m bench.policy [--seconds 5] [--concurrency 64] [--rounds 3]
                           [--loops asyncio,uvloop] [--baseline REV] [--no-doc]

1. ``command=allow`` at 64 concurrent kept-alive connections, driven by
   `wrk` (a C client: one thread, ``--latency``; the POST body and API key
   from a Lua script), against a real `lastlogin serve` (PostgreSQL;
   ``--rules``, 200 by default, deny rules by network loaded, none matching)
   per event loop in ``--loops``, and against a floor server in a process
   of its own (a minimal asyncio Protocol on the same event loop answering
   the fixed reply: no parsing, no decision).
   ``--baseline REV`` adds the daemon at git revision REV (extracted with
   `git archive`, asyncio). All are interleaved round by round (floor,
   lastlogin, ..., floor, ...); p50/p99 are wrk's, per round, medians over
   rounds, with the daemon's CPU per check from /proc.
2. IMAP logins through Dovecot 2.3 (no post-login step, so only the policy
   client differs) with auth_policy_server_url pointing at lastlogin versus
   not set, interleaved round by round; every failure is counted.

Needs `wrk` (scripts/bench installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from app.db import make_engine
from app.db.migrate import upgrade
from app.db.rules import add_rule
from bench.doc import write_section
from bench.handler import checkout, cpu_seconds, start_lastlogin
from tests.harness.dovecot import make_dovecot, policy_config
from tests.harness.mailclients import imap_login_ok
from tests.harness.pg import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-policy-key"
BODY = json.dumps({"login": "user@example.com", "pwhash": "0a1", "remote": "198.51.100.7",
                   "local": "127.0.0.1", "protocol": "imap", "session_id": "s1",
                   "tls": False})
FLOOR_ANSWER = (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                b'Content-Length: 24\r\n\r\n{"status": 0, "msg": ""}')
WRK_SCRIPT = f"""wrk.method = "POST"
wrk.body = {json.dumps(BODY)}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "{KEY}"
"""


# --- the floor: its own process, the fixed answer -------------------------------

class _Floor(asyncio.Protocol):
    """Answers every complete request (head + Content-Length body) with
    FLOOR_ANSWER, in order; nothing else."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            at = buf.find(b"Content-Length: ", 0, end) + 16
            length = int(buf[at:buf.index(b"\r\n", at)])
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length:]
            out.append(FLOOR_ANSWER)
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))


def floor_main(port: int, loop: str) -> None:
    async def serve():
        server = await asyncio.get_running_loop().create_server(
            _Floor, "127.0.0.1", port, backlog=1024)
        print("READY", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    if loop == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve())
    else:
        asyncio.run(serve())


class Floor:
    def __init__(self, loop: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.policy", "--floor",
                                      str(self.port), "--floor-loop", loop],
                                     env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if "READY" not in self.proc.stdout.readline().decode():
            raise RuntimeError("the floor server did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


# --- the client: wrk ----------------------------------------------------------------

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(port: int, seconds: float, concurrency: int, script: str) -> dict[str, float]:
    """One wrk run: p50/p99 in ms, requests/s, and what went wrong (counts)."""
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency",
                          "-s", script, f"http://127.0.0.1:{port}/?command=allow"],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    pct = {int(p): float(v) * _UNIT[u]
           for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    if len(pct) != 2 or rate is None or total is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    return {"p50_ms": pct[50], "p99_ms": pct[99], "per_s": float(rate[1]),
            "requests": int(total[1]), "bad": (int(non2xx[1]) if non2xx else 0)
            + (sum(int(n) for n in errors.groups()) if errors else 0)}


def allows(port: int) -> bool:
    """One check by hand: the daemon answers it with status 0."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/?command=allow", body=BODY.encode(),
                 headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    resp = conn.getresponse()
    ok = resp.status == 200 and json.loads(resp.read()) == {"status": 0, "msg": ""}
    conn.close()
    return ok


# --- through Dovecot ------------------------------------------------------------------

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


def through_dovecot(daemon, port: int, args) -> dict[str, float]:
    users = [f"u{i}" for i in range(args.login_threads)]
    runs: dict[str, list[float]] = {"policy off": [], "policy on": []}
    for _ in range(args.rounds):
        for mode in runs:
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
            runs[mode].append(ok / args.seconds)
    return {m: statistics.median(v) for m, v in runs.items()}


# --- the run ------------------------------------------------------------------------------

def database(rules: int):
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
        for i in range(rules):
            add_rule(conn, action="deny", remote_network=f"10.{i // 250}.{i % 250}.0/24",
                     comment="bench")
    engine.dispose()
    return pg, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--login-threads", type=int, default=8)
    ap.add_argument("--rules", type=int, default=200,
                    help="deny rules by network loaded (none matches the check's address)")
    ap.add_argument("--loops", default="asyncio,uvloop",
                    help="event loops to run lastlogin (and a floor) on, interleaved")
    ap.add_argument("--baseline", default="",
                    help="also run this git revision's daemon (asyncio), interleaved")
    ap.add_argument("--no-dovecot", action="store_true", help="skip the Dovecot on/off part")
    ap.add_argument("--no-doc", action="store_true", help="print only")
    ap.add_argument("--floor", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--floor-loop", default="asyncio", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor:
        floor_main(args.floor, args.floor_loop)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk; scripts/bench does)")
    loops = [lp for lp in args.loops.split(",") if lp]
    workdir = Path(tempfile.mkdtemp(prefix="llbench-policy-", dir="/tmp"))
    script = workdir / "allow.lua"
    script.write_text(WRK_SCRIPT)
    pg, url = database(args.rules)
    servers: dict[str, tuple[int, object]] = {}       # name -> (port, Floor or Daemon)
    try:
        for lp in loops:
            floor = Floor(lp)
            servers["floor" if lp == "asyncio" else f"floor-{lp}"] = (floor.port, floor)
            port = free_port()
            daemon = start_lastlogin(url, workdir, protocols="imap,pop3", name=f"ll-{lp}",
                                     policy_listen=f"127.0.0.1:{port}", policy_api_key=KEY,
                                     event_loop=lp)
            servers["lastlogin" if lp == "asyncio" else f"lastlogin-{lp}"] = (port, daemon)
        if args.baseline:
            port = free_port()
            daemon = start_lastlogin(url, workdir, protocols="imap,pop3", name="ll-base",
                                     code_dir=checkout(args.baseline, workdir),
                                     policy_listen=f"127.0.0.1:{port}", policy_api_key=KEY)
            servers[f"base-{args.baseline}"] = (port, daemon)
        for name, (port, _) in servers.items():
            if not name.startswith("floor") and not allows(port):
                raise SystemExit(f"{name} does not answer a check with status 0")
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for rnd in range(args.rounds):
            line = f"round {rnd + 1}:"
            for name, (port, server) in servers.items():
                pid = server.proc.pid
                cpu0 = cpu_seconds(pid)
                run = wrk(port, args.seconds, args.concurrency, str(script))
                run["cpu_ms"] = (cpu_seconds(pid) - cpu0) / max(run["requests"], 1) * 1000
                if run["bad"]:
                    raise SystemExit(f"{name}: {run['bad']} answers not 2xx or socket errors")
                runs[name].append(run)
                line += (f" {name} p50 {run['p50_ms']:.2f} p99 {run['p99_ms']:.2f} ms "
                         f"{run['per_s']:,.0f}/s;")
            print(line, flush=True)
        port, daemon = next(v for n, v in servers.items() if n.startswith("lastlogin"))
        dovecot = None if args.no_dovecot else through_dovecot(daemon, port, args)
    finally:
        for _, server in servers.values():
            server.stop()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report(runs, dovecot, args)


def report(runs: dict[str, list[dict[str, float]]], dovecot: dict[str, float] | None,
           args) -> None:
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    base = next((n for n in med if n.startswith("base-")), None)
    lines = [
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"median of {args.rounds} rounds of {args.seconds:g} s, interleaved; "
        f"`python -m bench.policy`.",
        "",
        f"Before-auth check (`command=allow`), {args.concurrency} concurrent kept-alive "
        f"connections (`wrk -t1`), {args.rules} rules loaded. The floor is a minimal asyncio "
        "Protocol in a process of its own answering the fixed reply, on the same event "
        "loop as the row below it; CPU is the server process's per request:",
        "",
        "| server | p50 ms | p99 ms | checks/s | CPU ms/check | p99 / floor | "
        "checks/s / floor |" + (f" p99 / {base} | checks/s / {base} |" if base else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if base else ""),
    ]
    for name, m in med.items():
        # each row against the floor on its own event loop (a baseline: asyncio's)
        floor = med.get("floor-uvloop" if name.endswith("uvloop") else "floor", m)
        lines.append(
            f"| {name} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['per_s']:,.0f} | "
            f"{m['cpu_ms']:.3f} | {m['p99_ms'] / floor['p99_ms']:.2f} | "
            f"{m['per_s'] / floor['per_s']:.2f} |"
            + (f" {m['p99_ms'] / med[base]['p99_ms']:.2f} | "
               f"{m['per_s'] / med[base]['per_s']:.2f} |" if base else ""))
    per_round = ("{} {}".format(n, ", ".join(f"{r['p99_ms']:.2f}" for r in rs))
                 for n, rs in runs.items())
    lines += ["", "p99 ms per round: " + "; ".join(per_round) + "."]
    if dovecot is not None:
        lines += [
            "",
            f"IMAP logins through Dovecot 2.3 ({args.login_threads} clients, no post-login):",
            "",
            "| Dovecot | logins/s | relative |",
            "|---|---|---|",
            f"| policy off | {dovecot['policy off']:,.0f} | 1.00 |",
            f"| policy on (lastlogin) | {dovecot['policy on']:,.0f} | "
            f"{dovecot['policy on'] / dovecot['policy off']:.2f} |",
        ]
    if args.no_doc:
        print("\n".join(lines))
    else:
        write_section("POLICY", "The auth policy endpoint", lines)


if __name__ == "__main__":
    main()
