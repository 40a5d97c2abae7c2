"""Faults injected for real into a database: locks, rows it refuses."""

from __future__ import annotations

import sqlite3

from sqlalchemy.engine import make_url

from app.db import make_engine


def hold_lock(url: str):
    """A transaction that holds last_logins (PostgreSQL) or the whole file
    (SQLite): every write waits behind it. Returns the function that lets go."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(make_url(url).database, timeout=5)
        conn.isolation_level = None
        conn.execute("BEGIN EXCLUSIVE")
        return conn.rollback
    engine = make_engine(url)
    conn = engine.connect()
    tx = conn.begin()
    conn.exec_driver_sql("LOCK TABLE last_logins IN ACCESS EXCLUSIVE MODE")

    def release():
        tx.rollback()
        conn.close()
        engine.dispose()
    return release


def reject_rows(url: str, name: str, on: bool, how: str = "check") -> None:
    """Make the database itself refuse login_events rows for ``name``.

    how="check": a CHECK constraint on PostgreSQL (SQLSTATE 23514), a trigger
    on SQLite; how="raise": a trigger that raises a plain exception
    (PostgreSQL P0001: not a data error, the database's own reason).
    """
    engine = make_engine(url)
    pg = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        if not pg:
            conn.exec_driver_sql(
                "CREATE TRIGGER trg_test_reject BEFORE INSERT ON login_events "
                f"WHEN NEW.username = '{name}' BEGIN SELECT RAISE(ABORT, 'rejected'); END"
                if on else "DROP TRIGGER trg_test_reject")
        elif how == "check":
            conn.exec_driver_sql(
                "ALTER TABLE login_events ADD CONSTRAINT ck_test_reject "
                f"CHECK (username <> '{name}') NOT VALID" if on else
                "ALTER TABLE login_events DROP CONSTRAINT ck_test_reject")
        elif on:
            conn.exec_driver_sql(f"""
                CREATE FUNCTION test_reject() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.username = '{name}' THEN RAISE EXCEPTION 'refused by a trigger'; END IF;
                    RETURN NEW;
                END $$""")
            conn.exec_driver_sql("CREATE TRIGGER trg_test_reject BEFORE INSERT ON login_events "
                                 "FOR EACH ROW EXECUTE FUNCTION test_reject()")
        else:
            conn.exec_driver_sql("DROP TRIGGER trg_test_reject ON login_events")
            conn.exec_driver_sql("DROP FUNCTION test_reject()")
    engine.dispose()


def slow_commits(url: str, seconds: float, on: bool) -> None:
    """PostgreSQL: every insert into login_events sleeps, without holding a
    lock anyone waits for -- a commit that lands late (not one cancelled)."""
    engine = make_engine(url)
    with engine.begin() as conn:
        if on:
            conn.exec_driver_sql(f"""
                CREATE FUNCTION test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$""")
            conn.exec_driver_sql("CREATE TRIGGER trg_test_slow AFTER INSERT ON login_events "
                                 "FOR EACH STATEMENT EXECUTE FUNCTION test_slow()")
        else:
            conn.exec_driver_sql("DROP TRIGGER trg_test_slow ON login_events")
            conn.exec_driver_sql("DROP FUNCTION test_slow()")
    engine.dispose()
