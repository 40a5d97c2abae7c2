"""Through a real Dovecot 2.3: what each way of tracking logins costs.

    python -m bench.dovecot_modes [--seconds 5] [--rounds 3] [--users 64]

Modes, interleaved round by round (floor, exec, wiki, plugin, lastlogin-pg,
lastlogin-sqlite, floor, ...):
  floor             no post-login at all
  null-socket       the post-login sockets answered by bench/null_handler.py (echo the
                    user, nothing stored): what any post-login socket service costs
  commit-socket     the same handlers committing each username to PostgreSQL before
                    answering (bench/null_handler.py --commit): what any post-login
                    service that commits every login first costs, at the least
  exec              script-login running a shell script that only does exec "$@"
  wiki              script-login with the wiki's script: psql -c "UPDATE ... '$USER'"
  plugin            Dovecot's last_login plugin writing to PostgreSQL via dict-sql
  lastlogin-pg      lastlogin on PostgreSQL (every login committed before the reply)
  lastlogin-sqlite  lastlogin on its embedded SQLite default
The load generator does real IMAP (greeting, LOGIN, tagged OK with the full
"Logged in" text, LOGOUT) and POP3 (USER, PASS, "+OK Logged in.", QUIT) at
concurrency 1 and 16, one user per worker (Dovecot limits connections per
user and address). Every mode's database writes are counted afterwards: a
mode that drops writes is broken, not fast. Needs the Debian packages
dovecot-imapd, dovecot-pop3d, dovecot-pgsql and postgresql-client.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from app.db import make_engine
from app.db.migrate import upgrade
from bench.doc import write_section
from bench.handler import NullHandler, pg_cpu_seconds, start_lastlogin
from bench.load import Run, drive
from tests.harness.dovecot import MAIL_UID, Dovecot
from tests.harness.mailclients import imap_login_ok, pop3_login_ok
from tests.harness.pg import free_port, start_server

MODES = ["floor", "exec", "wiki", "plugin", "lastlogin-pg", "lastlogin-sqlite"]
# Not in the default run (its table is the six above); --modes adds it.
EXTRA_MODES = ["null-socket", "commit-socket"]

NOOP = '#!/bin/sh\nexec "$@"\n'
WIKI = """#!/bin/sh
# the wiki's approach, as sites run it (a fork, a shell and a psql per login)
echo "UPDATE mailbox SET modified = now(), logins = logins + 1 WHERE username = '$USER'" \\
  | psql -q -h 127.0.0.1 -p {port} -U postgres wiki >/dev/null 2>&1
exec "$@"
"""
PLUGIN = """
protocol imap {{
  mail_plugins = $mail_plugins last_login
}}
protocol pop3 {{
  mail_plugins = $mail_plugins last_login
}}
plugin {{
  last_login_dict = proxy::lastlogin
  last_login_key = last-login/%u
}}
dict {{
  lastlogin = pgsql:{base}/dict-sql.conf.ext
}}
service dict {{
  unix_listener dict {{
    mode = 0666
  }}
}}
"""
DICT_SQL = """connect = host=127.0.0.1 port={port} dbname=plugin user=postgres
map {{
  pattern = shared/last-login/$user
  table = last_login
  value_field = last_login
  value_type = uint
  fields {{
    userid = $user
  }}
}}
"""


CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (from /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def cpu_of_tree(root: int) -> float:
    """CPU of a PostgreSQL server so far: ``root`` (the postmaster), its live
    backends and those it has reaped (bench.handler.pg_cpu_seconds)."""
    return pg_cpu_seconds(root)


class Bench:
    def __init__(self, users: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lldb-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.users = [f"u{i}@example.com" for i in range(users)]
        self.pg = start_server()
        self.admin = sa.create_engine(self.pg.url(), isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            for db in ("lastlogin", "wiki", "plugin", "floor"):
                conn.exec_driver_sql(f"CREATE DATABASE {db}")
        floor = make_engine(self.pg.url("floor"))
        with floor.begin() as conn:      # counted from the first round on
            conn.exec_driver_sql("CREATE TABLE bench_commit_floor (username bytea NOT NULL)")
        floor.dispose()
        self.ll_pg_url = self.pg.url("lastlogin")
        upgrade(self.ll_pg_url)
        self.ll_sqlite_url = f"sqlite:///{self.dir / 'lastlogin.db'}"
        upgrade(self.ll_sqlite_url)
        self.wiki = make_engine(self.pg.url("wiki"))
        with self.wiki.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE mailbox (username text PRIMARY KEY, "
                                 "modified timestamptz, logins bigint NOT NULL DEFAULT 0)")
            conn.execute(sa.text("INSERT INTO mailbox (username) VALUES (:u)"),
                         [{"u": u} for u in self.users])
        self.plugin = make_engine(self.pg.url("plugin"))
        with self.plugin.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE last_login (userid varchar(255) PRIMARY KEY, "
                                 "last_login bigint NOT NULL)")
        (self.dir / "noop.sh").write_text(NOOP)
        (self.dir / "wiki.sh").write_text(WIKI.format(port=self.pg.port))
        (self.dir / "dict-sql.conf.ext").write_text(DICT_SQL.format(port=self.pg.port))
        for f in ("noop.sh", "wiki.sh"):
            os.chmod(self.dir / f, 0o755)
        os.chmod(self.dir / "dict-sql.conf.ext", 0o644)
        home = self.dir / "home"
        home.mkdir()
        os.chown(home, MAIL_UID, MAIL_UID)
        self.dovecot = Dovecot(base=str(self.dir), socket_dir=str(self.dir / "ll"),
                               imap_port=free_port(), pop3_port=free_port())
        for u in self.users:
            self.dovecot.add_user(u.encode())
        self.daemon = None
        self.nulls: list[NullHandler] = []

    def config(self, mode: str) -> None:
        """Wire this Dovecot for ``mode`` (written when it starts)."""
        d = self.dovecot
        d.mail_debug = False
        d.extra = PLUGIN.format(base=self.dir) if mode == "plugin" else ""
        d.script = str(self.dir / ("noop.sh" if mode == "exec" else "wiki.sh"))
        d.mode = {"floor": "none", "plugin": "none", "exec": "script",
                  "wiki": "script"}.get(mode, "lastlogin")

    def start(self, mode: str) -> None:
        if mode.startswith("lastlogin"):
            url = self.ll_pg_url if mode == "lastlogin-pg" else self.ll_sqlite_url
            self.daemon = start_lastlogin(url, self.dir, protocols="imap,pop3")
        elif mode in ("null-socket", "commit-socket"):
            sockets = self.dir / "ll"
            sockets.mkdir(exist_ok=True)
            os.chmod(sockets, 0o755)
            for proto in ("imap", "pop3"):
                null = NullHandler(self.dir, str(sockets / f"{proto}.sock"),
                                   commit=self.pg.url("floor") if mode == "commit-socket"
                                   else None)
                os.chmod(null.path, 0o666)      # Dovecot's mail processes connect
                self.nulls.append(null)
        self.config(mode)
        self.dovecot.start()

    def handler_cpu(self) -> float:
        """CPU so far of what answers the post-login sockets (0: nothing does)."""
        pids = ([self.daemon.proc.pid] if self.daemon else
                [null.proc.pid for null in self.nulls])
        return sum(cpu_seconds(pid) for pid in pids)

    def pg_pid(self) -> int:
        return int(Path(self.pg.datadir, "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        self.dovecot.stop()
        if self.daemon:
            self.daemon.stop()
            self.daemon = None
        for null in self.nulls:
            null.stop()
        self.nulls = []

    def writes(self, mode: str) -> int:
        if mode == "lastlogin-pg" or mode == "lastlogin-sqlite":
            url = self.ll_pg_url if mode == "lastlogin-pg" else self.ll_sqlite_url
            engine = make_engine(url)
            with engine.connect() as conn:
                n = conn.execute(sa.text("SELECT count(*) FROM login_events")).scalar_one()
            engine.dispose()
            return n
        if mode == "commit-socket":
            engine = make_engine(self.pg.url("floor"))
            with engine.connect() as conn:
                n = conn.execute(sa.text("SELECT count(*) FROM bench_commit_floor")).scalar_one()
            engine.dispose()
            return n
        if mode == "wiki":
            with self.wiki.connect() as conn:
                return conn.execute(sa.text("SELECT sum(logins) FROM mailbox")).scalar_one()
        if mode == "plugin":
            time.sleep(1.5)                  # table statistics are flushed once a second
            with self.plugin.connect() as conn:
                conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
                return conn.execute(sa.text(
                    "SELECT n_tup_ins + n_tup_upd FROM pg_stat_user_tables "
                    "WHERE relname = 'last_login'")).scalar_one()
        return 0

    def close(self) -> None:
        self.stop()
        self.wiki.dispose()
        self.plugin.dispose()
        self.admin.dispose()
        self.pg.stop()


PGSQL_DRIVER = "/usr/lib/dovecot/modules/dict/libdriver_pgsql.so"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, of {', '.join(MODES + EXTRA_MODES)}")
    ap.add_argument("--no-doc", action="store_true", help="print, do not write the doc")
    args = ap.parse_args()
    if args.users < 16:
        ap.error("--users must be at least 16: each of the 16 workers logs in as its own user")
    modes = args.modes.split(",")
    if "plugin" in modes and not Path(PGSQL_DRIVER).exists():
        # Without it Dovecot's last_login plugin writes nothing, silently,
        # and would be measured doing nothing (scripts/bench installs it).
        raise SystemExit(f"the plugin mode needs Dovecot's PostgreSQL driver ({PGSQL_DRIVER}, "
                         "Debian package dovecot-pgsql)")
    bench = Bench(args.users)
    results: list[Run] = []
    checks: list[str] = []
    cpu: list[tuple[str, int, float, float]] = []
    try:
        bench.start("floor")                 # every user's maildir exists before timing
        for u in bench.users:
            assert (imap_login_ok(bench.dovecot.imap_port, u)
                    and pop3_login_ok(bench.dovecot.pop3_port, u))
        bench.stop()
        for rnd in range(args.rounds):
            for mode in modes:
                before = bench.writes(mode)
                bench.start(mode)
                pg_cpu0 = cpu_of_tree(bench.pg_pid())
                # the handler's start-up (imports, schema check) is not per-login work
                daemon_cpu0 = bench.handler_cpu()
                try:
                    done = 0
                    for proto, login, port in (("imap", imap_login_ok, bench.dovecot.imap_port),
                                               ("pop3", pop3_login_ok, bench.dovecot.pop3_port)):
                        for c in (1, 16):
                            r = drive(lambda n, _i: login(port, bench.users[n]),
                                      Run(mode, c, proto), args.seconds)
                            results.append(r)
                            done += r.logins
                            print(f"round {rnd + 1} {mode:17} {proto} c={c:<2} "
                                  f"{r.rate:7.0f}/s p50 {r.p50:6.2f} ms fail {r.failures}",
                                  flush=True)
                    daemon_cpu = bench.handler_cpu() - daemon_cpu0
                    pg_cpu = cpu_of_tree(bench.pg_pid()) - pg_cpu0
                    cpu.append((mode, done, daemon_cpu, pg_cpu))
                finally:
                    bench.stop()
                # counted once Dovecot is stopped: its dict process's database
                # session has then ended and flushed its table statistics
                wrote = bench.writes(mode) - before
                expect = 0 if mode in ("floor", "exec", "null-socket") else done
                verdict = "ok" if wrote == expect else "MISMATCH"
                checks.append(f"round {rnd + 1} {mode}: {done} logins, {wrote} writes "
                              f"counted ({verdict})")
                print(checks[-1], flush=True)
    finally:
        bench.close()
    wrong = [c for c in checks if c.endswith("(MISMATCH)")]
    if wrong:
        raise SystemExit("writes do not match the logins, the run is not a measurement: "
                         + "; ".join(wrong))
    write_doc(results, modes, checks, cpu, args)


def write_doc(results: list[Run], modes: list[str], checks: list[str], cpu, args) -> None:
    def med(mode, proto, c, attr):
        xs = [getattr(r, attr) for r in results if (r.mode, r.proto, r.concurrency) ==
              (mode, proto, c)]
        return statistics.median(xs) if xs else float("nan")

    version = subprocess.run(["dovecot", "--version"], capture_output=True,
                             text=True).stdout.strip()
    lines = [f"Measured {dt.date.today().isoformat()} on {platform.node()} "
             f"({os.cpu_count()} cores, Dovecot {version}, Python "
             f"{platform.python_version()}); `python -m bench.dovecot_modes`: {args.rounds} "
             f"rounds, modes interleaved, {args.seconds:g} s per protocol and concurrency, "
             f"{args.users} users; medians over rounds. Client, Dovecot, PostgreSQL and the "
             "handler share the 2 cores.", ""]
    for proto in ("imap", "pop3"):
        lines += [f"**{proto.upper()}**", "",
                  "| mode | logins/s c=1 | p50 c=1 | logins/s c=16 | vs floor c=16 | "
                  "p50 c=1 above floor | failures |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        floor16, floor_p50 = med("floor", proto, 16, "rate"), med("floor", proto, 1, "p50")
        for mode in modes:
            fails = sum(r.failures for r in results if (r.mode, r.proto) == (mode, proto))
            lines.append(
                f"| {mode} | {med(mode, proto, 1, 'rate'):,.0f} | "
                f"{med(mode, proto, 1, 'p50'):.2f} ms | {med(mode, proto, 16, 'rate'):,.0f} | "
                f"{med(mode, proto, 16, 'rate') / floor16:.2f} | "
                f"{med(mode, proto, 1, 'p50') - floor_p50:+.2f} ms | {fails} |")
        if "wiki" in modes and "lastlogin-pg" in modes:
            ratio = med("lastlogin-pg", proto, 16, "rate") / med("wiki", proto, 16, "rate")
            lines += ["", f"lastlogin-pg / wiki at c=16: {ratio:.1f} x", ""]
    lines += ["CPU per login, medians over rounds (the handler process; PostgreSQL's "
              "server processes, which serve the plugin's dict writes, the wiki's psql and "
              "lastlogin's commits alike):", "",
              "| mode | handler CPU per login | PostgreSQL CPU per login |", "|---|---:|---:|"]
    for mode in modes:
        rows = [(d, dc, pc) for m, d, dc, pc in cpu if m == mode and d]
        if rows:
            lines.append(f"| {mode} | {statistics.median(dc / d for d, dc, _ in rows) * 1000:.2f}"
                         f" ms | {statistics.median(pc / d for d, _, pc in rows) * 1000:.2f} ms |")
    lines += ["", "Writes counted after each mode and round (login_events rows for lastlogin, "
              "bench_commit_floor rows for commit-socket, sum of the counter the wiki script bumps, the plugin table's inserts + "
              "updates from pg_stat_user_tables):", ""]
    lines += [f"- {c}" for c in checks]
    if args.no_doc:
        print("\n".join(lines))
    else:
        write_section("DOVECOT", "Through Dovecot", lines)


if __name__ == "__main__":
    main()
