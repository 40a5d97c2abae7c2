"""Engines with the settings lastlogin relies on, per backend."""

from __future__ import annotations

import math
import os
import stat
import urllib.parse
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import make_url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the CLI read while the daemon writes; synchronous=FULL makes a
    # commit durable before the login is answered.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def dialect_insert(conn: sa.Connection, table: sa.Table):
    """INSERT with ON CONFLICT support, for the connection's backend."""
    from sqlalchemy.dialects import postgresql, sqlite
    return (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table)


SQLITE_SIDE_FILES = ("", "-wal", "-shm", "-journal")


def private_sqlite_file(path: str, group: str | int | None = None,
                        tighten: bool = False) -> None:
    """Make the SQLite database file exist as 0600 (0640 and ``group`` when a
    reader group is configured) before SQLite opens it. SQLite gives its
    -wal/-shm/-journal files the database file's mode. With ``tighten`` (the
    daemon, which knows ``database_group``), files that are ours get exactly
    that mode, e.g. those an older version left world-readable."""
    from ..safedirs import group_id
    gid = group_id(group)
    mode = 0o640 if gid is not None else 0o600
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
        try:
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)         # exactly: the umask may be tighter than 0640
        finally:
            os.close(fd)
    except FileExistsError:
        pass
    if not tighten:
        return
    for suffix in SQLITE_SIDE_FILES:
        try:
            st = os.lstat(path + suffix)
        except FileNotFoundError:
            continue
        if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
            continue
        if gid is not None and st.st_gid != gid:
            os.chown(path + suffix, -1, gid, follow_symlinks=False)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path + suffix, mode)


def _sqlite_reader_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # No journal_mode (setting it writes the file's header): a reader takes the
    # database as the writer left it. query_only refuses writes a second time.
    cur.execute("PRAGMA query_only=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


READ_ONLY_STATEMENT_TIMEOUT = 10.0      # seconds: a reader's query gives up after


# The daemon's bounds on one write, from its record_timeout (``write_bound``).
# The server gives up waiting for a lock after one bound and on a statement
# after four. Its statement_timeout does not cover the commit's own waits
# (a synchronous standby that does not confirm, a stalled WAL flush), and a
# server, or a path to it, that is gone sends nothing at all: so a writer
# that has no reply a bound after the statement_timeout asks the server to
# cancel the statement (a live server then answers, if only with an error:
# a commit waiting for a standby completes locally), and drops the
# connection if no reply comes a little later still (``ReplyBound``).
# The kernel bounds every connection of the engine as well: tcp_user_timeout
# (sent data not acknowledged) and keepalives (an idle connection whose
# peer vanished).
TCP_FLOOR = 10.0        # seconds: no TCP bound below this (lost segments are resent)


def write_timeouts(write_bound: float) -> tuple[int, int]:
    """(lock_timeout, statement_timeout) in milliseconds (never 0: that is "none")."""
    ms = max(1, math.ceil(write_bound * 1000))
    return ms, ms * 4


@dataclass(frozen=True)
class ReplyBound:
    """How long a writer waits for the server's reply: ``deadline`` seconds,
    then it sends a cancel request (itself given ``grace`` seconds), then
    ``grace`` more for the reply before it drops the connection as gone."""
    deadline: float
    grace: float

    @classmethod
    def for_write_bound(cls, write_bound: float) -> "ReplyBound":
        return cls(write_timeouts(write_bound)[1] / 1000 + write_bound, write_bound)

    @property
    def give_up(self) -> float:
        return self.deadline + 2 * self.grace


def _tcp_bounds(write_bound: float) -> dict[str, int]:
    """libpq's TCP settings for the daemon's connections (ignored on a UNIX socket)."""
    bound = max(TCP_FLOOR, ReplyBound.for_write_bound(write_bound).deadline)
    return {"keepalives": 1, "keepalives_idle": math.ceil(bound),
            "keepalives_interval": max(1, math.ceil(write_bound)), "keepalives_count": 3,
            "tcp_user_timeout": math.ceil(bound * 1000)}


def make_engine(url: str, *, connect_timeout: int = 5,
                write_bound: float | None = None,
                file_group: str | int | None = None, tighten: bool = False,
                read_only: bool = False, pooled: bool = True) -> sa.Engine:
    """An engine for ``url``; the SQLite file (and its directory) is created
    private (``private_sqlite_file``).

    ``read_only`` (the dashboard, status): nothing can be written through it.
    SQLite opens the file with ``mode=ro`` and never creates it (a missing
    file fails to connect); PostgreSQL sessions start with
    default_transaction_read_only=on and a statement_timeout.

    ``pooled=False`` (PostgreSQL; the daemon's writers and replayer): every
    connection is opened afresh, never one that sat idle in a pool (it may
    have gone silent meanwhile, and the pool's liveness ping has no bound).

    libpq parameters the URL sets itself (connect_timeout, keepalives...)
    are the operator's and are kept; its ``options`` are kept too, with the
    daemon's settings after them.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if read_only and parsed.database and parsed.database != ":memory:":
            path = os.path.abspath(parsed.database)
            ro = parsed.set(database="file:" + urllib.parse.quote(path),
                            query={**parsed.query, "mode": "ro", "uri": "true"})
            engine = sa.create_engine(ro, connect_args={"timeout": 5})
            sa.event.listen(engine, "connect", _sqlite_reader_pragmas)
            return engine
        if parsed.database and parsed.database != ":memory:":
            private_sqlite_file(parsed.database, file_group, tighten)
        engine = sa.create_engine(url, connect_args={"timeout": 5})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    args: dict[str, object] = {"connect_timeout": connect_timeout,
                               "application_name": "lastlogin"}
    theirs = parsed.query.get("options")
    options = [theirs if isinstance(theirs, str) else " ".join(theirs)] if theirs else []
    if write_bound:
        # The daemon's statements give up instead of hanging behind a lock,
        # and its connections instead of waiting on a server that is gone.
        lock_ms, statement_ms = write_timeouts(write_bound)
        options.append(f"-c lock_timeout={lock_ms} -c statement_timeout={statement_ms}")
        args.update(_tcp_bounds(write_bound))
    if read_only:
        ms = int(READ_ONLY_STATEMENT_TIMEOUT * 1000)
        options.append(f"-c default_transaction_read_only=on -c statement_timeout={ms}")
    if options:
        args["options"] = " ".join(options)
    # (connect_args win over the URL's query: leave the URL's own alone)
    args = {k: v for k, v in args.items() if k == "options" or k not in parsed.query}
    if not pooled:
        return sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=args)
    return sa.create_engine(url, pool_pre_ping=True, connect_args=args)
