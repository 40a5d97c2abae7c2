"""Handler-only benchmark: lastlogin against a do-nothing handler, no Dovecot.

    python -m bench.handler [--seconds 5] [--rounds 3] [--concurrency 1,8,64]
                            [--memory-logins 100000] [--profile] [--smoke]
                            [--baseline REV] [--client c|python] [--no-doc]

A client speaks the post-login protocol exactly as Dovecot's mail process
does (request line + one real socket fd via SCM_RIGHTS, one request per
connection), at each concurrency, against (A) the do-nothing
handler in bench/null_handler.py and (B) `lastlogin serve` on PostgreSQL,
interleaved round by round (A B A B ...). Every login lastlogin answered is
counted in the database afterwards. --baseline REV adds a daemon running
that git revision's code (extracted to a temporary directory), interleaved
with the others: what a change bought, measured in the same run. Results (logins/s, p50/p95/p99 from send
to reply, ratios of medians) go into docs/performance.md between the
HANDLER markers, with a second table, the CPU budget per login: in the same
run, the handler's CPU (the null handler's or the daemon's process), the load
client's (the C client's process; with the Python client, the benchmark
process's own), PostgreSQL's (every process of the throw-away server; "-" for
a server given by LASTLOGIN_BENCH_DATABASE_URL) and their total, against the
CPU time the machine had (wall seconds x cores): whether a target rate is
within reach on the cores at all. --smoke: a few hundred logins with each
client, correctness only.

The client (--client): "c" (the default where gcc is found) is
bench/postlogin_load.c, one thread and epoll, compiled with the system gcc
into the run's temporary directory; "python" is bench/load.py's threads,
which at concurrency 64 are themselves the bottleneck (the GIL, on the
cores the servers need), so the daemon's tail latency cannot be read there.
"""

from __future__ import annotations

import argparse
import array
import datetime as dt
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from app.db import make_engine
from app.db.migrate import upgrade
from app.protocol import build_request, tab_escape
from bench.doc import write_section
from bench.load import Run, drive as drive_load
from tests.harness.daemon import Daemon, make_daemon
from tests.harness.pg import PgServer, server_url
from tests.harness.postlogin import answered

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [b"uid=5000", b"gid=5000", b"home=/var/vmail/example.com/user",
          b"mail=maildir:~/Maildir", b"auth_mech=PLAIN",
          b"auth_token=3f2a0c9e5b7d41e08a6c2f1b9d3e7a5c4b8f0e12"]


def one_login(path: str, username: bytes) -> bool:
    """One exchange exactly as Dovecot does it; True if a reply line came back."""
    return answered(path, build_request(b"192.0.2.25", b"198.51.100.7", username, FIELDS))


def drive(path: str, mode: str, concurrency: int, seconds: float | None, count: int | None,
          prefix: str, client: CClient | None = None) -> Run:
    """Logins of fresh users ``<prefix><worker>-<i>@example.com`` against ``path``:
    from Python threads, or from the C client ``client`` when given."""
    if client is not None:
        return client.drive(path, mode, concurrency, seconds, count, prefix)
    cpu0 = time.process_time()          # the client is this process's threads
    run = drive_load(lambda n, i: one_login(path, f"{prefix}{n}-{i}@example.com".encode()),
                     Run(mode, concurrency), seconds, count)
    run.client_cpu = time.process_time() - cpu0
    return run


MARK = b"{worker-i}"


def request_parts(prefix: str) -> tuple[bytes, bytes]:
    """The request one_login sends for ``<prefix><worker>-<i>@example.com``,
    as the bytes before and after ``<worker>-<i>`` (which the C client
    writes). Refuses a prefix the username would have to be tab-escaped for:
    the C client inserts digits and '-' only and escapes nothing."""
    sample = f"{prefix}0-0@example.com".encode()
    if tab_escape(sample) != sample or MARK in sample:
        raise ValueError(f"prefix {prefix!r}: the username would need escaping")
    parts = build_request(b"192.0.2.25", b"198.51.100.7",
                          prefix.encode() + MARK + b"@example.com", FIELDS).split(MARK)
    if len(parts) != 2 or parts[0] + b"0-0" + parts[1] != build_request(
            b"192.0.2.25", b"198.51.100.7", sample, FIELDS):
        raise ValueError(f"prefix {prefix!r}: cannot cut the request around the username")
    return parts[0], parts[1]


class CClient:
    """bench/postlogin_load.c, built with the system gcc into ``workdir``."""

    SOURCE = ROOT / "bench" / "postlogin_load.c"

    def __init__(self, workdir: Path, login_timeout: float = 20.0) -> None:
        gcc = shutil.which("gcc")
        if gcc is None:
            raise RuntimeError("gcc not found: cannot build the C load client "
                               "(bench/postlogin_load.c); use --client python")
        self.workdir = workdir
        self.exe = workdir / "postlogin_load"
        self.login_timeout = login_timeout
        subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-o", str(self.exe), str(self.SOURCE)],
                       check=True)

    def drive(self, path: str, mode: str, concurrency: int, seconds: float | None,
              count: int | None, prefix: str) -> Run:
        """As bench.load.drive: ``concurrency`` logins in flight, for ``seconds`` or
        ``count`` logins in all (count // concurrency per worker)."""
        before, after = request_parts(prefix)
        lat = self.workdir / "latencies.bin"
        cmd = [str(self.exe), "-c", str(concurrency), "-b", before.hex(), "-a", after.hex(),
               "-T", repr(self.login_timeout), "-o", str(lat)]
        cmd += ["-t", repr(float(seconds))] if seconds is not None else ["-n", str(count)]
        out = subprocess.run(cmd + [path], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{self.exe.name} exited {out.returncode}: {out.stderr.strip()}")
        got = dict(kv.split("=", 1) for kv in out.stdout.split())
        run = Run(mode, concurrency, logins=int(got["logins"]), failures=int(got["failures"]),
                  seconds=float(got["seconds"]), client_cpu=float(got["cpu"]))
        samples = array.array("d")
        samples.frombytes(lat.read_bytes())
        lat.unlink()
        if len(samples) != run.logins:
            raise RuntimeError(f"{len(samples)} latencies for {run.logins} logins")
        run.latencies = samples.tolist()
        return run


def make_client(choice: str, workdir: Path) -> CClient | None:
    """The client --client asks for (None: Python threads)."""
    if choice == "python":
        return None
    return CClient(workdir)


class NullHandler:
    """bench/null_handler.py as a process: it prints READY once it listens.
    ``commit``: the commit floor, on that database (a SQLAlchemy URL)."""

    def __init__(self, workdir: Path, path: str | None = None, commit: str | None = None) -> None:
        self.path = path or str(workdir / "null.sock")
        self.log = open(workdir / ("null.log" if path is None else f"null-{Path(path).stem}.log"),
                        "ab")
        argv = [sys.executable, "-m", "bench.null_handler", self.path]
        if commit is not None:
            argv += ["--commit", sa.engine.make_url(commit).set(drivername="postgresql")
                     .render_as_string(hide_password=False)]
        self.proc = subprocess.Popen(argv,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)},
                                     stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "READY" not in line:
            raise RuntimeError(f"the null handler did not start: {line!r}; see {self.log.name}")

    def sock(self, _protocol: str) -> str:
        return self.path

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()


FLOOR = "commit-floor"      # the mode: bench/null_handler.py --commit


def start_lastlogin(url: str, workdir: Path, protocols: str = "imap", name: str = "ll",
                    code_dir: str | None = None, wrapper: list[str] | None = None,
                    timeout: float = 20.0, **settings: str) -> Daemon:
    """`lastlogin serve` through the test harness (ready when it says so on
    NOTIFY_SOCKET), sockets in ``workdir``/``name``, quiet logs (unless
    ``log_level`` is given). ``code_dir``: another checkout's code."""
    settings.setdefault("log_level", "warning")
    daemon = make_daemon(url, socket_dir=str(workdir / name), protocols=protocols,
                         data_dir=str(workdir / f"{name}-data"), **settings)
    daemon.code_dir = code_dir
    daemon.wrapper = wrapper or []
    daemon.start(timeout)
    return daemon


def checkout(rev: str, workdir: Path) -> str:
    """The code of git revision ``rev``, extracted under ``workdir``."""
    dest = workdir / f"code-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return str(dest)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postmaster_pid(server: PgServer | None) -> int | None:
    """The pid of ``server``'s postmaster (the first line of postmaster.pid);
    None for no server of ours (one LASTLOGIN_BENCH_DATABASE_URL gives)."""
    if server is None:
        return None
    return int(Path(server.datadir, "postmaster.pid").read_text().split()[0])


def pg_cpu_seconds(postmaster: int) -> float:
    """User + system CPU so far of a PostgreSQL server: the postmaster, its
    live children (backends, background workers) and, through the
    postmaster's cutime/cstime, the children it has reaped, so that a backend
    ending between two readings is neither lost nor counted twice."""
    clk = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                    # ended meanwhile: counted in cutime, if it was ours
        if int(entry.name) == postmaster:
            total += sum(int(f) for f in fields[11:15]) / clk
        elif int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / clk
    return total


def machine_cpu_seconds() -> float:
    """CPU the whole machine has spent so far, all cores (/proc/stat: all but
    idle and iowait; guest time is within user time)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measured(handler_pid: int, postmaster: int | None, go: Callable[[], Run]) -> Run:
    """``go()``'s run, with the CPU the handler (process ``handler_pid``) and
    PostgreSQL (``postmaster``'s server, if any) used meanwhile and the wall
    time that took, and what every process on the machine used (the
    client's CPU ``go`` measures itself)."""
    db0 = pg_cpu_seconds(postmaster) if postmaster is not None else 0.0
    cpu0 = cpu_seconds(handler_pid)
    machine0 = machine_cpu_seconds()
    t0 = time.monotonic()
    run = go()
    run.wall = time.monotonic() - t0
    run.machine_cpu = machine_cpu_seconds() - machine0
    run.cpu = cpu_seconds(handler_pid) - cpu0
    if postmaster is not None:
        run.db_cpu = pg_cpu_seconds(postmaster) - db0
    return run


def budget(run: Run) -> dict[str, float | None]:
    """``run``'s CPU per login in ms: handler, client, PostgreSQL (None: not
    measured), their total, the whole machine's (every process, ours or
    not), and the CPU time available (wall x cores); busy: total / available."""
    per = lambda sec: sec / run.logins * 1000 if run.logins else float("nan")  # noqa: E731
    total = run.cpu + run.client_cpu + (run.db_cpu or 0.0)
    available = run.wall * (os.cpu_count() or 1)
    return {"handler": per(run.cpu), "client": per(run.client_cpu),
            "db": None if run.db_cpu is None else per(run.db_cpu), "total": per(total),
            "machine": per(run.machine_cpu), "available": per(available),
            "busy": total / available if available else float("nan")}


def rss_kib(pid: int) -> int:
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1])
    return 0


def database() -> tuple[str, PgServer | None]:
    """A PostgreSQL database at head: LASTLOGIN_BENCH_DATABASE_URL's, or on a
    throw-away server (returned, to stop) as the test suite starts one."""
    url, server = server_url("LASTLOGIN_BENCH_DATABASE_URL")
    upgrade(url)
    return url, server


def stored_events(url: str, prefix: str, floor: bool = False) -> int:
    """Logins of users ``prefix``... stored: lastlogin's, or the commit floor's."""
    engine = make_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.text(
            "SELECT count(*) FROM bench_commit_floor WHERE username LIKE convert_to(:p, 'UTF8')"
            if floor else "SELECT count(*) FROM login_events WHERE username LIKE :p"),
            {"p": prefix + "%"}).scalar_one()
    engine.dispose()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--memory-logins", type=int, default=100_000)
    ap.add_argument("--profile", action="store_true", help="py-spy the daemon at c=64")
    ap.add_argument("--smoke", action="store_true", help="few logins, correctness only")
    ap.add_argument("--loops", default="asyncio,uvloop",
                    help="event loops to run lastlogin with, each its own daemon, interleaved")
    ap.add_argument("--baseline", default="",
                    help="also run this git revision's code (asyncio), interleaved")
    ap.add_argument("--log-level", default="warning",
                    help="the daemons' log level (info: the one line per login is written)")
    ap.add_argument("--client", choices=["c", "python"], default=None,
                    help="the load client: c (bench/postlogin_load.c, the default where gcc "
                         "is found) or python (threads)")
    ap.add_argument("--no-sqlite", dest="sqlite", action="store_false",
                    help="do not also run lastlogin (asyncio) on the embedded SQLite default")
    ap.add_argument("--no-commit-floor", dest="commit_floor", action="store_false",
                    help="do not also run the commit floor (the null handler committing each "
                         "username to PostgreSQL before its reply)")
    ap.add_argument("--no-doc", action="store_true", help="print, do not write the doc")
    args = ap.parse_args()
    if args.client is None:
        args.client = "c" if shutil.which("gcc") else "python"
        if args.client == "python":
            print("gcc not found: the Python load client is used, itself the bottleneck "
                  "at high concurrency", flush=True)
    loops = [lp for lp in args.loops.split(",") if lp]
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="llbench-", dir="/tmp"))
    url, server = database()
    postmaster = postmaster_pid(server)
    runs: list[Run] = []
    client = make_client(args.client, workdir) if not args.smoke else None
    try:
        null = NullHandler(workdir)
        null_path = null.path
        daemons = {mode_of(lp): start_lastlogin(url, workdir, name=f"ll-{lp}", event_loop=lp,
                                                log_level=args.log_level)
                   for lp in loops}
        urls = dict.fromkeys(daemons, url)
        if args.sqlite and not args.smoke:
            urls["lastlogin-sqlite"] = f"sqlite:///{workdir / 'lastlogin.db'}"
            upgrade(urls["lastlogin-sqlite"])
            daemons["lastlogin-sqlite"] = start_lastlogin(
                urls["lastlogin-sqlite"], workdir, name="ll-sqlite", log_level=args.log_level)
        if args.baseline:
            daemons[f"base-{args.baseline}"] = start_lastlogin(
                url, workdir, name="ll-base", code_dir=checkout(args.baseline, workdir),
                log_level=args.log_level)
            urls[f"base-{args.baseline}"] = url
        ll = next(iter(daemons.values()))
        ll_path = ll.sock("imap")
        if args.commit_floor and not args.smoke:
            # first among the modes: null, commit floor, lastlogin, ... in each round
            daemons = {FLOOR: NullHandler(workdir, str(workdir / "floor.sock"), commit=url),
                       **daemons}
            urls[FLOOR] = url
        try:
            if args.smoke:
                smoke(null_path, ll_path, url, workdir, null.proc.pid, ll.proc.pid, postmaster)
                return
            for rnd in range(args.rounds):
                for c in levels:
                    runs.append(failed(measured(
                        null.proc.pid, postmaster,
                        lambda: drive(null_path, "null", c, args.seconds, None,
                                      f"n{rnd}c{c}-", client))))
                    line = f"round {rnd + 1} c={c}: null {runs[-1].rate:.0f}/s"
                    budgets = [budget_line(runs[-1])]
                    for k, (mode, daemon) in enumerate(daemons.items()):
                        prefix = f"b{rnd}c{c}m{k}-"
                        run = failed(measured(
                            daemon.proc.pid, postmaster,
                            lambda: drive(daemon.sock("imap"), mode, c, args.seconds, None,
                                          prefix, client)))
                        stored = stored_events(urls[mode], prefix, mode == FLOOR)
                        if stored != run.logins:
                            raise SystemExit(f"{prefix}: {run.logins} answered but "
                                             f"{stored} stored")
                        runs.append(run)
                        line += (f", {mode} {run.rate:.0f}/s "
                                 f"{run.cpu / max(run.logins, 1) * 1000:.3f} ms CPU/login "
                                 f"(stored {stored})")
                        budgets.append(budget_line(run))
                    print(line, flush=True)
                    print("  CPU ms/login handler+client+PostgreSQL=total (machine) of available: "
                          + "; ".join(budgets), flush=True)
            if args.profile:
                profile(ll, ll_path, workdir, client)
            memory = {mode: memory_run(d, d.sock("imap"), args.memory_logins, str(k), client)
                      for k, (mode, d) in enumerate(daemons.items())
                      if mode != FLOOR} if args.memory_logins else {}
        finally:
            null.stop()
            for daemon in daemons.values():
                daemon.stop()
        write_doc(runs, levels, memory, args, list(daemons))
    finally:
        if server:
            server.stop()


def budget_line(run: Run) -> str:
    b = budget(run)
    db = "-" if b["db"] is None else f"{b['db']:.3f}"
    return (f"{run.mode} {b['handler']:.3f}+{b['client']:.3f}+{db}={b['total']:.3f} "
            f"(machine {b['machine']:.3f}) of {b['available']:.3f} ({b['busy']:.0%})")


def failed(run: Run) -> Run:
    """``run``, unless logins failed in it: then its figures do not hold."""
    if run.failures:
        raise SystemExit(f"{run.mode} c={run.concurrency}: {run.failures} logins failed "
                         f"({run.logins} answered); the run is not a measurement")
    return run


def mode_of(loop: str) -> str:
    """The mode's name in the tables: lastlogin (asyncio), lastlogin-uvloop."""
    return "lastlogin" if loop == "asyncio" else f"lastlogin-{loop}"


def smoke(null_path: str, ll_path: str, url: str, workdir: Path, null_pid: int, ll_pid: int,
          postmaster: int | None) -> None:
    """Both clients (the C one is built here: no gcc, no smoke), both handlers;
    the CPU budget is measured and must be there (no figure is judged)."""
    for name, client in (("python", None), ("c", CClient(workdir))):
        for c in (1, 8):
            base = measured(null_pid, postmaster, lambda: drive(
                null_path, "null", c, None, 96, f"s{name}n{c}-", client))
            run = measured(ll_pid, postmaster, lambda: drive(
                ll_path, "lastlogin", c, None, 96, f"s{name}l{c}-", client))
            stored = stored_events(url, f"s{name}l{c}-")
            assert base.failures == 0 and run.failures == 0, (name, base.failures, run.failures)
            assert base.logins == 96 and len(base.latencies) == 96, (name, base.logins)
            assert run.logins == 96 and stored == 96, (name, run.logins, stored)
            for r in (base, run):
                b = budget(r)
                assert r.client_cpu > 0 and r.wall > 0 and r.cpu >= 0, (name, r)
                assert (b["db"] is None) == (postmaster is None), (name, b)
                assert b["db"] is None or b["db"] >= 0, (name, b)
                # /proc counts in 10 ms ticks: a 96-login run may show none
                assert b["total"] > 0 and b["machine"] >= 0 and b["available"] > 0, (name, b)
        print(f"smoke ({name} client): 2 x 96 logins answered by both handlers, "
              "every lastlogin login stored once; CPU ms/login handler+client+PostgreSQL"
              f"=total (machine) of available: {budget_line(base)}; {budget_line(run)}")
    floor = NullHandler(workdir, str(workdir / "floor.sock"), commit=url)
    try:
        run = failed(drive(floor.path, FLOOR, 8, None, 96, "sfloor-", client))
        stored = stored_events(url, "sfloor-", floor=True)
    finally:
        floor.stop()
    assert run.logins == 96 and stored == 96, (run.logins, stored)
    print(f"smoke ({FLOOR}): 96 logins answered, {stored} usernames committed")


def profile(ll: Daemon, path: str, workdir: Path, client: CClient | None = None) -> None:
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    pyspy = str(Path(sys.executable).with_name("py-spy"))
    spy = subprocess.Popen([pyspy, "record", "--pid", str(ll.proc.pid), "--duration", "8",
                            "--rate", "200", "--format", "speedscope", "-o",
                            str(out / "handler-c64.speedscope.json")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    drive(path, "lastlogin", 64, 8.0, None, "prof-", client)
    spy.wait(60)


def memory_run(ll: Daemon, path: str, total: int, tag: str = "",
               client: CClient | None = None) -> tuple[int, int, int]:
    """RSS after the first tenth of ``total`` logins and after all of them."""
    first = total // 10
    drive(path, "lastlogin", 16, None, first, f"memA{tag}-", client)
    early = rss_kib(ll.proc.pid)
    drive(path, "lastlogin", 16, None, total - first, f"memB{tag}-", client)
    late = rss_kib(ll.proc.pid)
    return total, early, late


CLIENTS = {
    "c": "Client: bench/postlogin_load.c (C, one thread, epoll, `--client c`).",
    "python": "Client: Python threads, bench/load.py (`--client python`), itself the "
              "bottleneck at concurrency 64.",
}
CLIENT_CPU = {
    "c": "the C client's process (getrusage at its end)",
    "python": "the benchmark process's own CPU over the run (its client threads; "
              "Python client)",
}


def budget_table(runs: list[Run], levels: list[int], modes: list[str], client: str) -> list[str]:
    """The CPU budget per login, medians over rounds of each figure (so a
    median total need not be the sum of the medians above it)."""
    ncpu = os.cpu_count()
    measured_db = all(r.db_cpu is not None for r in runs)
    lines = ["CPU budget per login, the same runs: ms of CPU per login answered, medians "
             "over rounds of each column. handler: the null handler's or the daemon's "
             f"process (/proc); client: {CLIENT_CPU[client]}; PostgreSQL: "
             + ("every process of the throw-away server (postmaster, backends, background "
                "workers, and those that ended during the run), also while the null handler "
                "or lastlogin-sqlite runs, where it is the idle server's own work; "
                if measured_db else 'not measured ("-"), a server not started by the '
                "benchmark (LASTLOGIN_BENCH_DATABASE_URL), so total leaves it out; ")
             + "total: the three, per run; whole machine: the CPU every process used meanwhile "
             "(/proc/stat; above total: the benchmark process, the kernel's own threads and "
             "other work on the machine); available: the CPU time the machine had, wall "
             f"seconds x {ncpu} cores, per login; busy: total / available.", "",
             "| concurrency | mode | logins/s | handler | client | PostgreSQL | total | "
             "whole machine | available | busy |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    med = lambda rs, k: statistics.median(budget(r)[k] for r in rs)   # noqa: E731
    for c in levels:
        for mode in ["null", *modes]:
            rs = [r for r in runs if r.mode == mode and r.concurrency == c]
            if not rs:
                continue
            db = (f"{med(rs, 'db'):.3f} ms" if all(r.db_cpu is not None for r in rs)
                  else "-")
            lines.append(f"| {c} | {mode} | {statistics.median(r.rate for r in rs):,.0f} | "
                         f"{med(rs, 'handler'):.3f} ms | {med(rs, 'client'):.3f} ms | {db} | "
                         f"{med(rs, 'total'):.3f} ms | {med(rs, 'machine'):.3f} ms | "
                         f"{med(rs, 'available'):.3f} ms | "
                         f"{med(rs, 'busy'):.0%} |")
    return lines


def write_doc(runs: list[Run], levels: list[int], memory, args, modes: list[str]) -> None:
    lines = [f"Measured {dt.date.today().isoformat()} on {platform.node()} ({os.cpu_count()} "
             f"cores, Python {platform.python_version()}); `python -m bench.handler`: "
             f"{args.rounds} rounds x {args.seconds:g} s per mode and concurrency, interleaved "
             f"(null, {', '.join(modes)}, null, ...), medians over rounds. lastlogin on "
             "PostgreSQL (lastlogin-sqlite: on the embedded SQLite default, synchronous="
             "FULL), every login committed before its reply (one daemon per event "
             "loop, same database); the null handler does no work at all; commit-floor: "
             "the null handler committing each username to PostgreSQL before its reply "
             "(bench/null_handler.py --commit: one column, no index, group commit), the "
             "least a handler that commits every login can do. "
             f"{CLIENTS[args.client]} Client and servers share the "
             f"{os.cpu_count()} cores; null p50/p99: the do-nothing handler's latency, the "
             "floor that client, handler loop and machine set together.", "",
             "| concurrency | mode | null handler logins/s | lastlogin logins/s | ratio | "
             "lastlogin p50 | p95 | p99 | null p50 | null p99 | daemon CPU per login | "
             "spread (lastlogin rates) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    med = lambda rs, p: statistics.median(r.pct(p) for r in rs)   # noqa: E731
    for c in levels:
        null = [r for r in runs if r.mode == "null" and r.concurrency == c]
        nr = statistics.median(r.rate for r in null)
        for mode in modes:
            ll = [r for r in runs if r.mode == mode and r.concurrency == c]
            lr = statistics.median(r.rate for r in ll)
            lines.append(f"| {c} | {mode} | {nr:,.0f} | {lr:,.0f} | {lr / nr:.2f} | "
                         f"{med(ll, 50):.2f} ms | {med(ll, 95):.2f} ms | {med(ll, 99):.2f} ms | "
                         f"{med(null, 50):.2f} ms | {med(null, 99):.2f} ms | "
                         f"{statistics.median(r.cpu_per_login for r in ll):.3f} ms | "
                         f"{', '.join(f'{r.rate:,.0f}' for r in ll)} |")
    lines.append("")
    lines += budget_table(runs, levels, modes, args.client)
    lines.append("")
    for mode, (total, early, late) in memory.items():
        lines.append(f"Memory ({mode}): resident size {early / 1024:.1f} MiB after "
                     f"{total // 10:,} logins, {late / 1024:.1f} MiB after {total:,} "
                     f"({(late - early) / early * 100:+.1f} %).")
    if args.no_doc:
        print("\n".join(lines))
    else:
        write_section("HANDLER", "Handler only (no Dovecot)", lines)


if __name__ == "__main__":
    main()
