"""Engines with the settings lastlogin relies on, per backend."""

from __future__ import annotations

import os

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


def make_engine(url: str, *, connect_timeout: int = 5,
                write_bound: float | None = None) -> sa.Engine:
    """An engine for ``url``; the SQLite file's directory is created."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 5})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    args: dict[str, object] = {"connect_timeout": connect_timeout,
                               "application_name": "lastlogin"}
    if write_bound:
        # The daemon's statements give up instead of hanging behind a lock.
        ms = int(write_bound * 1000)
        args["options"] = f"-c lock_timeout={ms} -c statement_timeout={ms * 4}"
    return sa.create_engine(url, pool_pre_ping=True, connect_args=args)
