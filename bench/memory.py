"""Resident memory of the daemon from 100 k to 1 M logins.

    python -m bench.memory [--logins 1000000] [--step 100000] [--concurrency 32]
                           [--no-doc]

`lastlogin serve` on PostgreSQL, the handler benchmark's client (a real fd
with every request, one fresh user per login: per-user state would show as
growth), RSS from /proc after every step. Every login answered is counted in
the database at the end. The target: flat within +-5 % from the first step
(100 k logins) to the last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
from pathlib import Path

from bench.doc import write_section
from bench.handler import database, drive, rss_kib, start_lastlogin, stored_events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logins", type=int, default=1_000_000)
    ap.add_argument("--step", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmem-", dir="/tmp"))
    url, server = database()
    samples: list[tuple[int, int]] = []
    answered = failures = 0
    try:
        daemon = start_lastlogin(url, workdir, name="mem")
        try:
            for _ in range(args.logins // args.step):
                run = drive(daemon.sock("imap"), "mem", args.concurrency, None, args.step,
                            f"mem{len(samples)}-")
                answered += run.logins
                failures += run.failures
                samples.append((answered, rss_kib(daemon.proc.pid)))
                print(f"{answered:,} logins: RSS {samples[-1][1] / 1024:.1f} MiB "
                      f"({run.rate:.0f}/s)", flush=True)
        finally:
            daemon.stop()
        stored = stored_events(url, "mem")
    finally:
        if server:
            server.stop()
    if failures or stored != answered:
        raise SystemExit(f"{answered} answered, {failures} failed, {stored} stored")
    first, last = samples[0][1], samples[-1][1]
    peak = max(s[1] for s in samples)
    lines = [f"Measured {dt.date.today().isoformat()} on {platform.node()} (Python "
             f"{platform.python_version()}); `python -m bench.memory`: lastlogin on "
             f"PostgreSQL, concurrency {args.concurrency}, one fresh user per login, "
             f"{answered:,} logins answered and {stored:,} stored.", "",
             "| logins | resident size |", "|---:|---:|"]
    lines += [f"| {n:,} | {kib / 1024:.1f} MiB |" for n, kib in samples]
    lines += ["", f"From {samples[0][0]:,} to {samples[-1][0]:,} logins: "
                  f"{(last - first) / first * 100:+.1f} % (peak {peak / 1024:.1f} MiB)."]
    if args.no_doc:
        print("\n".join(lines))
    else:
        write_section("MEMORY", "Memory from 100 k to 1 M logins", lines)


if __name__ == "__main__":
    main()
