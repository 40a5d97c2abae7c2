"""CPU per login as instructions, counted by valgrind's callgrind: stable on
a shared, noisy machine where timings are not.

    python -m bench.instructions [--logins 2000] [--concurrency 1,16]
                                 [--baseline REV] [--no-doc]

`lastlogin serve` (PostgreSQL) runs under ``valgrind --tool=callgrind`` with
instrumentation off; after a warm-up the bench switches it on
(``callgrind_control -i on``), makes a fixed number of logins with the
handler benchmark's client, dumps the counters and divides the instructions
of the whole process -- event loop, writer thread, libpq -- by the logins,
with the event loop thread apart: the writer's share per login depends on
how many logins share a commit, counted too (the statements libpq sent).
At concurrency 1 every login is its own commit; at 16 logins share commits
as they do under load. ``perf stat`` would do the same without the 50x
slowdown, but this machine's kernel exposes no hardware counters to it.
--baseline REV measures that git revision's code the same way, in the same
run. Every login is counted in the database afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import os
import platform
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.doc import write_section
from bench.handler import checkout, database, drive, start_lastlogin, stored_events


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


_COMMIT_CALLS = ("PQsendQueryPrepared", "PQsendQueryParams")


def calls_to(text: str, names: tuple[str, ...]) -> int:
    """Calls to the functions ``names`` recorded in one callgrind dump."""
    total = 0
    for name in names:
        m = re.search(r"^c?fn=\((\d+)\) %s$" % re.escape(name), text, re.M)
        if m:
            total += sum(int(c) for c in re.findall(
                r"^cfn=\(%s\)(?: .*)?\ncalls=(\d+)" % m.group(1), text, re.M))
    return total


@dataclass
class Counted:
    """One dump of the daemon, its threads apart (--separate-threads)."""

    loop: int = 0           # instructions on the event loop thread (thread 1)
    others: int = 0         # the writer thread, libpq, executors and the rest
    commits: int = 0        # statements the writer or the loop lane sent (one per batch)
    logins: int = 0

    @property
    def total(self) -> int:
        return self.loop + self.others


def instructions(pattern: str) -> Counted:
    """Instructions per thread over the dump files matching ``pattern`` (one
    file per thread: cg.PID.PART-TT)."""
    got = Counted()
    for path in glob.glob(pattern):
        text = Path(path).read_text(errors="replace")
        m = re.search(r"^totals:\s+(\d+)", text, re.M)
        if not m:
            continue
        if path.endswith("-01"):
            got.loop += int(m.group(1))
        else:
            got.others += int(m.group(1))
        # The writer thread's statements, and the loop lane's (app/lane.py)
        got.commits += calls_to(text, _COMMIT_CALLS)
    return got


def measure(url: str, workdir: Path, name: str, code_dir: str | None, logins: int,
            levels: list[int], log_level: str = "info") -> dict[int, Counted]:
    """Instructions per login at each concurrency, for one daemon."""
    out = workdir / f"cg-{name}"
    out.mkdir()
    wrapper = [shutil.which("valgrind") or "valgrind", "--tool=callgrind",
               "--instr-atstart=no", "--separate-threads=yes", "--fair-sched=yes",
               f"--callgrind-out-file={out}/cg.%p"]
    daemon = start_lastlogin(url, workdir, name=f"ll-{name}", code_dir=code_dir,
                             wrapper=wrapper, timeout=600, log_level=log_level)
    pid = str(daemon.proc.pid)
    result: dict[int, Counted] = {}
    try:
        path = daemon.sock("imap")
        drive(path, "warm", 4, None, 400, f"i{name}w-")
        for c in levels:
            for old in glob.glob(f"{out}/cg.*"):
                os.rename(old, f"{old}.c{c}.old")
            prefix = f"i{name}c{c}-"
            control("-z", pid)
            control("-i", "on", pid)
            run = drive(path, name, c, None, logins, prefix)
            control("-i", "off", pid)
            control("-d", pid)
            stored = stored_events(url, prefix)
            if stored != run.logins:
                raise SystemExit(f"{name} c={c}: {run.logins} answered, {run.failures} "
                                 f"failed, {stored} stored")
            if run.failures:        # the client gave up on a slow (instrumented) daemon
                print(f"{name} c={c}: {run.failures} logins failed (client timeout)")
            got = instructions(f"{out}/cg.*[0-9]")
            got.logins = run.logins
            result[c] = got
            print(f"{name} c={c}: {run.logins} logins, {got.total:,} instructions, "
                  f"{got.total / run.logins:,.0f} per login (event loop "
                  f"{got.loop / run.logins:,.0f}, other threads "
                  f"{got.others / run.logins:,.0f}; {got.commits} commits)", flush=True)
    finally:
        daemon.stop(120)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logins", type=int, default=1600)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--baseline", default="", help="also measure this git revision's code")
    ap.add_argument("--log-level", default="info",
                    help="the daemon's (info, the default: one line per login, to a file)")
    ap.add_argument("--no-doc", action="store_true", help="print, do not write the doc")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="llinstr-", dir="/tmp"))
    url, server = database()
    try:
        results = {"lastlogin": measure(url, workdir, "lastlogin", None, args.logins, levels,
                                            args.log_level)}
        if args.baseline:
            results[f"base-{args.baseline}"] = measure(
                url, workdir, "base", checkout(args.baseline, workdir), args.logins, levels,
                args.log_level)
    finally:
        if server:
            server.stop()
    base = f"base-{args.baseline}" if args.baseline else None
    lines = [f"Measured {dt.date.today().isoformat()} on {platform.node()} "
             f"(Python {platform.python_version()}); `python -m bench.instructions`: "
             f"{args.logins:,} logins per concurrency under callgrind after 400 warm-up "
             f"logins, log level {args.log_level}; instructions of the daemon process "
             "divided by the logins, the event loop thread apart from the others (the "
             "writer thread and libpq, mostly; on PostgreSQL the loop lane commits from "
             "the event loop itself, so there the writer's work is in the event loop "
             "column). The writer's share depends on how many logins share a commit, "
             "which under valgrind (threads run one at a time) is not what it is in "
             "production: hence the commits column (statements sent, by any thread). "
             "lastlogin on "
             "PostgreSQL, every login committed before its reply and counted in the "
             "database afterwards.", "",
             "| c | code | per login | event loop | other threads | logins per commit "
             "| other threads per commit | per login vs base | event loop vs base |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in levels:
        for name, per in results.items():
            got = per[c]
            ref = results[base][c] if base else None
            n = got.logins or 1
            lines.append(
                f"| {c} | {name} | {got.total / n:,.0f} | {got.loop / n:,.0f} | "
                f"{got.others / n:,.0f} | {n / max(got.commits, 1):.2f} | "
                f"{got.others / max(got.commits, 1):,.0f} | "
                + (f"{(got.total / n) / (ref.total / (ref.logins or 1)):.2f} | "
                   f"{(got.loop / n) / (ref.loop / (ref.logins or 1)):.2f} |"
                   if ref is not None and name != base else "- | - |"))
    if args.no_doc:
        print("\n".join(lines))
    else:
        write_section("INSTRUCTIONS", "Instructions per login", lines)


if __name__ == "__main__":
    main()
