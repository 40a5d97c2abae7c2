"""A daemon and a Dovecot wired to it, on an emptied PostgreSQL database."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from app.db import make_engine
from tests.harness.db import empty_tables


@contextmanager
def running(pg_url: str, daemon, dovecot, users: list[bytes]) -> Iterator[tuple]:
    """Start the daemon, then Dovecot with ``users``; yield (dovecot, daemon, engine).
    Both are stopped and the tables emptied afterwards."""
    engine = make_engine(pg_url)
    empty_tables(engine)
    for name in users:
        dovecot.add_user(name)
    try:
        daemon.start()
        dovecot.start()
        yield dovecot, daemon, engine
    finally:
        dovecot.stop()
        daemon.stop()
        empty_tables(engine)
        engine.dispose()
