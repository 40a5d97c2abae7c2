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


@contextmanager
def running24(pg_url: str, users: list[bytes], extra: str = "",
              **settings: str) -> Iterator[tuple]:
    """A Dovecot 2.4 (in its chroot) and a daemon on ``pg_url`` with
    ``settings``, running, the database emptied: (dovecot, daemon, engine).
    ``extra``: more Dovecot configuration."""
    import shutil

    import pytest

    from tests.harness.daemon import make_daemon
    from tests.harness.dovecot24 import make_dovecot24
    from tests.harness.pg import MissingComponent
    try:
        dovecot = make_dovecot24()
    except MissingComponent as exc:
        pytest.fail(str(exc), pytrace=False)
    dovecot.extra = extra
    daemon = make_daemon(pg_url, socket_dir=dovecot.socket_dir, protocols="imap,pop3",
                         **settings)
    try:
        with running(pg_url, daemon, dovecot, users) as parts:
            yield parts
    finally:
        shutil.rmtree(dovecot.outside, ignore_errors=True)
