"""A throw-away PostgreSQL primary and its streaming standby, for failover tests.

The primary is made like tests/harness/pg.py's server; the standby is a
``pg_basebackup -R`` copy of it that streams its WAL. With ``synchronous``
the primary waits for the standby to flush each commit before it answers
(``synchronous_standby_names`` naming the standby, whose ``cluster_name``
is its application_name), so a commit the primary acknowledged is on the
standby too. ``kill_primary`` ends the primary's postmaster with SIGKILL
(by its pid, read from postmaster.pid) -- a crash, not a shutdown -- and
``promote`` makes the standby the new primary. Only processes of these two
servers are ever signalled, each by its pid.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .pg import MissingComponent, PgServer, _run_as, find_pg_bindir, free_port

STANDBY_NAME = "standby1"


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (a postmaster's backends and helpers)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


@dataclass
class Node(PgServer):
    """One server of the pair; ``options`` are added to its command line."""

    options: str = ""

    def _own(self, path: str) -> None:
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def launch(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} "
                f"-c fsync=on -c max_connections=100 {self.options}")
        subprocess.run(self._cmd("pg_ctl", "-D", self.datadir, "-w", "-t", "60",
                                 "-l", os.path.join(self.base, "log"), "-o", opts, "start"),
                       check=True, capture_output=True)

    def postmaster_pid(self) -> int:
        with open(os.path.join(self.datadir, "postmaster.pid")) as fh:
            return int(fh.readline())

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(os.path.join(self.base, "log"), errors="replace") as fh:
                return fh.read()[-n:]
        except OSError:
            return ""


def _new_node(bindir: str, user: str | None, prefix: str, options: str) -> Node:
    base = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(base, 0o755)
    node = Node(bindir, base, free_port(), user, options)
    node._own(base)
    return node


@dataclass
class PgPair:
    primary: Node
    standby: Node
    synchronous: bool
    _killed: list[int] | None = None

    def url(self, dbname: str = "postgres") -> str:
        """Both servers in one URL; libpq connects to whichever takes writes."""
        return (f"postgresql+psycopg://postgres@/{dbname}?host=127.0.0.1:{self.primary.port}"
                f"&host=127.0.0.1:{self.standby.port}&target_session_attrs=read-write")

    def kill_primary(self, timeout: float = 15.0) -> None:
        """SIGKILL the primary's postmaster; its backends see it die and exit."""
        pid = self.primary.postmaster_pid()
        children = _children(pid)
        self._killed = [pid, *children]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in self._killed) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._reap()

    def _reap(self) -> None:
        """Whatever of the killed server still runs is ended, by pid."""
        for p in self._killed or ():
            if _alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def promote(self) -> None:
        subprocess.run(self.standby._cmd("pg_ctl", "-D", self.standby.datadir, "-w",
                                         "-t", "60", "promote"),
                       check=True, capture_output=True)

    def stop(self) -> None:
        if self._killed is None:
            self.primary.stop()
        else:
            self._reap()
            shutil.rmtree(self.primary.base, ignore_errors=True)
        self.standby.stop()


def _psql(node: Node, sql: str) -> str:
    out = subprocess.run(node._cmd("psql", "-h", "127.0.0.1", "-p", str(node.port),
                                   "-U", "postgres", "-d", "postgres", "-Atc", sql),
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def start_pair(synchronous: bool = True) -> PgPair:
    """A primary and a streaming standby that has caught up with it."""
    bindir = find_pg_bindir()
    user = _run_as()
    sync = f"-c synchronous_standby_names={STANDBY_NAME}" if synchronous else ""
    primary = _new_node(bindir, user, "llpgp-", sync)
    standby = _new_node(bindir, user, "llpgs-", f"-c cluster_name={STANDBY_NAME}")
    pair = PgPair(primary, standby, synchronous)
    try:
        os.makedirs(primary.datadir)
        primary._own(primary.datadir)
        subprocess.run(primary._cmd("initdb", "-D", primary.datadir, "-U", "postgres",
                                    "-A", "trust", "-E", "UTF8", "--no-sync"),
                       check=True, capture_output=True)
        primary.launch()
        # -R: standby.signal and primary_conninfo; -X stream: the WAL it needs.
        subprocess.run(standby._cmd("pg_basebackup", "-D", standby.datadir, "-h", "127.0.0.1",
                                    "-p", str(primary.port), "-U", "postgres", "-R",
                                    "-X", "stream", "--no-sync"),
                       check=True, capture_output=True)
        standby.launch()
        wanted = "sync" if synchronous else "async"
        deadline = time.monotonic() + 30
        while _psql(primary, "SELECT sync_state FROM pg_stat_replication "
                             f"WHERE application_name = '{STANDBY_NAME}' "
                             "AND state = 'streaming'") != wanted:
            if time.monotonic() > deadline:
                raise MissingComponent(f"the standby did not start streaming:\n"
                                       f"{standby.log_tail()}")
            time.sleep(0.1)
    except subprocess.CalledProcessError as exc:
        pair.stop()
        raise MissingComponent(
            f"could not build the primary/standby pair: {exc.cmd[-1]}: "
            f"{(exc.stderr or b'').decode(errors='replace')}"
            f"{primary.log_tail()}{standby.log_tail()}") from None
    except BaseException:
        pair.stop()
        raise
    return pair

