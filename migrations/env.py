"""Alembic environment for lastlogin.

The URL comes from, in order: a connection handed over by the caller
(``config.attributes["connection"]``), ``sqlalchemy.url`` in the Alembic
config, then lastlogin's own settings (file + LASTLOGIN_* environment), so
``alembic upgrade head`` and ``lastlogin db upgrade`` hit the same database.
"""

from contextlib import contextmanager

import sqlalchemy as sa
from alembic import context

from app.config import load_settings
from app.db.engine import make_engine
from app.db.schema import include_name, metadata

config = context.config
target_metadata = metadata

# Every mail host runs `lastlogin db upgrade` before `serve` (scripts/serve),
# so on a shared PostgreSQL upgrades run concurrently: one session-level
# advisory lock makes them take turns, and the later one finds the schema at
# head. A fixed key ("llmigr" in ASCII), easy to spot in pg_locks.
MIGRATION_LOCK_KEY = 0x6C6C6D696772


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    return url or load_settings().effective_database_url


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=False,
        include_name=include_name,
        # SQLite cannot ALTER most things: batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=True,
    )


@contextmanager
def _migration_lock(connection):
    """Hold the PostgreSQL advisory lock while migrating (a no-op on SQLite,
    a file of one host). Taken before lock_timeout is set: waiting for
    another host's upgrade is expected, not a reason to give up."""
    if connection.dialect.name != "postgresql":
        yield
        return
    connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    connection.commit()         # the lock is the session's; end the implicit transaction
    try:
        yield
    finally:
        if connection.in_transaction():
            connection.rollback()   # a failed migration: unlock outside its transaction
        connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"),
                           {"key": MIGRATION_LOCK_KEY})
        connection.commit()


def _timeouts(connection) -> None:
    # A migration must not queue behind a long transaction while holding a
    # lock that blocks every login record: give up quickly instead.
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET lock_timeout = '4s'")
        connection.exec_driver_sql("SET statement_timeout = '10min'")


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata,
                      literal_binds=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _timeouts(connection)
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    # lastlogin's own engine: the same SQLite pragmas, and the SQLite file's
    # directory is made if it does not exist yet (a fresh machine).
    engine = make_engine(_url())
    with engine.connect() as connection, _migration_lock(connection):
        _timeouts(connection)
        # SET opened a transaction; end it so Alembic runs (and commits) its own.
        connection.commit()
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
