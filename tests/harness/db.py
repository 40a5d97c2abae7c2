"""Database helpers shared by test modules: empty the tables, read what a
login left behind."""

from __future__ import annotations

import sqlalchemy as sa

from app.db.schema import last_logins, login_events, metadata
from app.login import username_text


def empty_tables(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            if table.name != "config_version":      # one row the schema owns
                conn.execute(table.delete())


def events_of(engine: sa.Engine, user: bytes):
    """The login_events rows of ``user``, oldest first."""
    text, _ = username_text(user)
    with engine.connect() as conn:
        return conn.execute(sa.select(login_events).where(login_events.c.username == text)
                            .order_by(login_events.c.occurred_at)).all()


def last_of(engine: sa.Engine, user: bytes, protocol: str):
    """The last_logins row of ``user`` for ``protocol``, or None."""
    text, _ = username_text(user)
    with engine.connect() as conn:
        return conn.execute(sa.select(last_logins).where(
            last_logins.c.username == text, last_logins.c.protocol == protocol)).one_or_none()


def stored(url: str) -> tuple[list[str], int]:
    """What the trail holds: (usernames in login_events, sorted; sum of login_count)."""
    from app.db import make_engine
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            names = conn.execute(sa.select(login_events.c.username)).scalars().all()
            total = conn.execute(sa.select(sa.func.sum(last_logins.c.login_count))).scalar()
    finally:
        engine.dispose()
    return sorted(names), int(total or 0)
