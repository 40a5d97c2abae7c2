"""Shared fixtures: real PostgreSQL (and SQLite) databases.

PostgreSQL comes from LASTLOGIN_TEST_DATABASE_URL (a URL whose user may
CREATE DATABASE) or from a throw-away server this suite starts itself. If
neither is possible the tests that need it fail with the reason; nothing is
skipped.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
import uuid
from typing import Iterator

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.migrate import upgrade
from tests.harness.db import empty_tables
from tests.harness.pg import MissingComponent, PgServer, database_url, server_url

_counter = itertools.count()


class PgCluster:
    """Creates databases on one server and drops them at the end."""

    def __init__(self, admin_url: str, server: PgServer | None) -> None:
        self.admin_url = admin_url
        self.server = server
        self.admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.created: list[str] = []

    def create_database(self, options: str = "") -> str:
        """``options``: what CREATE DATABASE takes after the name (a locale ...)."""
        name = f"lltest_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}" {options}')
        self.created.append(name)
        return database_url(self.admin_url, name)

    def close(self) -> None:
        with self.admin.connect() as conn:
            for name in self.created:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin.dispose()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    try:
        url, server = server_url("LASTLOGIN_TEST_DATABASE_URL")
    except MissingComponent as exc:
        pytest.fail(f"PostgreSQL is required for this test: {exc}", pytrace=False)
    cluster = PgCluster(url, server)
    try:
        yield cluster
    finally:
        cluster.close()
        if server:
            server.stop()


@pytest.fixture(scope="session")
def pg_url(pg_cluster: PgCluster) -> str:
    """A PostgreSQL database at head, shared by the session (tables emptied per test)."""
    url = pg_cluster.create_database()
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'lastlogin.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated database on each backend, empty before and after the test
    (tests that use the session's databases directly may leave rows)."""
    yield from emptied(request.getfixturevalue(
        "pg_url" if request.param == "postgresql" else "sqlite_url"))


def emptied(url: str) -> Iterator[str]:
    """``url``, with its tables emptied before and after the test."""
    engine = make_engine(url)
    empty_tables(engine)
    yield url
    empty_tables(engine)
    engine.dispose()


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[str]:
    """The session's PostgreSQL database alone, empty before and after the test."""
    yield from emptied(pg_url)


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[str]:
    """The session's SQLite database alone, empty before and after the test."""
    yield from emptied(sqlite_url)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A database with nothing in it, on each backend."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_cluster").create_database()
    return f"sqlite:///{tmp_path / 'empty.db'}"


@pytest.fixture
def tiny_tmpfs():
    """A real file system with room for a few records: ENOSPC for real."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs for the full-disk tests needs root", pytrace=False)
    path = tempfile.mkdtemp(prefix="llfull-", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k,mode=0700", "tmpfs", path],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)
