"""The same daemon's instructions per login, through Dovecot and from the
handler benchmark's client, in one run:

    python -m bench.dovecot_instructions [--logins 300] [--rounds 2]

Through Dovecot the daemon's CPU *time* per login (bench.dovecot_modes) is
two to three times what the handler benchmark measures. This tells whether
that is more work or the same work on colder caches: `lastlogin serve`
(PostgreSQL, log level warning, as in bench.dovecot_modes) runs under
callgrind with instrumentation off; IMAP logins through a real Dovecot
2.3 and logins from bench/handler.py's Python client are then counted in
turn, at concurrency 1, each after a reset of the counters. Every login is
counted in the database afterwards. Prints; writes no doc section (the
figures are quoted in docs/performance.md).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil

from bench.dovecot_modes import Bench
from bench.handler import drive as handler_drive, start_lastlogin, stored_events
from bench.instructions import control, instructions
from bench.load import Run, drive
from tests.harness.mailclients import imap_login_ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logins", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    bench = Bench(16)
    try:
        bench.start("floor")                 # every user's maildir exists first
        for u in bench.users:
            assert imap_login_ok(bench.dovecot.imap_port, u)
        bench.stop()
        out = bench.dir / "cg"
        out.mkdir()
        wrapper = [shutil.which("valgrind") or "valgrind", "--tool=callgrind",
                   "--instr-atstart=no", "--separate-threads=yes", "--fair-sched=yes",
                   f"--callgrind-out-file={out}/cg.%p"]
        bench.daemon = start_lastlogin(bench.ll_pg_url, bench.dir, protocols="imap,pop3",
                                       wrapper=wrapper, timeout=600)
        bench.config("lastlogin-pg")
        bench.dovecot.start()
        pid = str(bench.daemon.proc.pid)
        path = bench.daemon.sock("imap")

        def through_dovecot(count: int) -> Run:
            return drive(lambda n, _i: imap_login_ok(bench.dovecot.imap_port, bench.users[n]),
                         Run("dovecot", 1), None, count)

        through_dovecot(50)                                   # warm-up, both ways
        handler_drive(path, "warm", 1, None, 50, "warm-")
        for rnd in range(args.rounds):
            for way in ("dovecot", "handler client"):
                for old in glob.glob(f"{out}/cg.*"):
                    os.rename(old, f"{old}.{rnd}.old")
                before = stored_events(bench.ll_pg_url, "")
                control("-z", pid)
                control("-i", "on", pid)
                run = (through_dovecot(args.logins) if way == "dovecot"
                       else handler_drive(path, way, 1, None, args.logins, f"r{rnd}-"))
                control("-i", "off", pid)
                control("-d", pid)
                added = stored_events(bench.ll_pg_url, "") - before
                if added != run.logins or run.failures:
                    raise SystemExit(f"{way}: {run.logins} answered, {run.failures} failed, "
                                     f"{added} stored")
                got = instructions(f"{out}/cg.*[0-9]")
                print(f"round {rnd + 1} {way:15} {run.logins} logins: "
                      f"{got.total / run.logins:,.0f} instructions per login (event loop "
                      f"{got.loop / run.logins:,.0f}, other threads "
                      f"{got.others / run.logins:,.0f}; {got.commits} commits)", flush=True)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
