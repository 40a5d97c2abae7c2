"""CPU per login as instructions, counted by valgrind's callgrind: stable on
a shared, noisy machine where timings are not.

    python -m bench.instructions [--logins 2000] [--concurrency 1,16]
                                 [--baseline REV] [--no-doc]

`lastlogin serve` (PostgreSQL) runs under ``valgrind --tool=callgrind`` with
instrumentation off; after a warm-up the bench switches it on
(``callgrind_control -i on``), makes a fixed number of logins with the
handler benchmark's client, dumps the counters and divides the instructions
of the whole process -- event loop, writer thread, libpq -- by the logins.
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
from pathlib import Path

from bench.doc import write_section
from bench.handler import checkout, database, drive, start_lastlogin, stored_events


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def instructions(pattern: str) -> int:
    """Total Ir over the dump files matching ``pattern`` (one per dump)."""
    total = 0
    for path in glob.glob(pattern):
        text = Path(path).read_text(errors="replace")
        m = re.search(r"^totals:\s+(\d+)", text, re.M)
        if m:
            total = max(total, int(m.group(1)))
    return total


def measure(url: str, workdir: Path, name: str, code_dir: str | None, logins: int,
            levels: list[int], log_level: str = "info") -> dict[int, float]:
    """Instructions per login at each concurrency, for one daemon."""
    out = workdir / f"cg-{name}"
    out.mkdir()
    wrapper = [shutil.which("valgrind") or "valgrind", "--tool=callgrind",
               "--instr-atstart=no", f"--callgrind-out-file={out}/cg.%p"]
    daemon = start_lastlogin(url, workdir, name=f"ll-{name}", code_dir=code_dir,
                             wrapper=wrapper, timeout=600, log_level=log_level)
    pid = str(daemon.proc.pid)
    result: dict[int, float] = {}
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
            ir = instructions(f"{out}/cg.*[0-9]")
            result[c] = ir / run.logins
            print(f"{name} c={c}: {run.logins} logins, {ir:,} instructions, "
                  f"{ir / run.logins:,.0f} per login", flush=True)
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
    lines = [f"Measured {dt.date.today().isoformat()} on {platform.node()} "
             f"(Python {platform.python_version()}); `python -m bench.instructions`: "
             f"{args.logins:,} logins per concurrency under callgrind after 400 warm-up "
             f"logins, log level {args.log_level}, instructions of the whole daemon process "
             "(event loop, writer thread, libpq) divided by the logins; lastlogin on PostgreSQL, every login committed "
             "before its reply and counted in the database afterwards.", "",
             "| code | " + " | ".join(f"instructions per login, c={c}" for c in levels) + " |",
             "|---|" + "---:|" * len(levels)]
    for name, per in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{per[c]:,.0f}" for c in levels) + " |")
    if args.no_doc:
        print("\n".join(lines))
    else:
        write_section("INSTRUCTIONS", "Instructions per login", lines)


if __name__ == "__main__":
    main()
