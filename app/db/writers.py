"""Batch writers for the recorder: one per backend.

PostgreSQL gets a fast path: the whole batch -- events, last_logins fold,
alert deliveries -- is one prepared statement over arrays, run on a
dedicated autocommit connection. A single statement is its own transaction,
so a batch costs one round trip and one WAL flush, whatever its size.
Everything else uses the SQLAlchemy path (app/db/store.record_logins),
which is also what imports and replays use; both give the same rows
(tests/test_store.py runs against both).
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa

from ..login import LoginRecord
from .store import record_logins, unique_events

# Parameters are arrays, one element per record (unnest keeps them in step).
PG_BATCH = """
WITH input AS (
    SELECT * FROM unnest(%(event_id)s::uuid[], %(occurred_at)s::timestamptz[],
                         %(username)s::text[], %(username_raw)s::bytea[],
                         %(protocol)s::text[], %(remote_ip)s::inet[], %(local_ip)s::inet[],
                         %(outcome)s::text[], %(rule_id)s::int[], %(auth_mech)s::text[],
                         %(master_user)s::text[], %(auth_user)s::text[],
                         %(message)s::text[], %(policy_applied)s::bool[], %(host)s::text[],
                         %(session_id)s::text[])
        AS t(event_id, occurred_at, username, username_raw, protocol, remote_ip, local_ip,
             outcome, rule_id, auth_mech, master_user, auth_user, message, policy_applied,
             host, session_id)
), new AS (
    -- Only the rows this statement inserts are folded below: a record
    -- written twice (spooled and committed late) counts once.
    INSERT INTO login_events (event_id, occurred_at, username, username_raw, protocol,
                              remote_ip, local_ip, outcome, rule_id, auth_mech,
                              master_user, auth_user, message, policy_applied, host,
                              session_id)
    SELECT * FROM input
    ON CONFLICT (event_id, occurred_at) DO NOTHING
    RETURNING event_id, occurred_at, username, username_raw, protocol, remote_ip, local_ip,
              outcome, host
), folded AS (
    -- ORDER BY: writers on several mail hosts lock the same users' rows in
    -- the same order, so concurrent batches wait for each other, never deadlock.
    INSERT INTO last_logins AS l (username, protocol, username_raw, first_seen, last_seen,
                                  last_remote_ip, last_local_ip, last_host, login_count)
    SELECT username, protocol, (array_agg(username_raw))[1], min(occurred_at), max(occurred_at),
           (array_agg(remote_ip ORDER BY occurred_at DESC))[1],
           (array_agg(local_ip ORDER BY occurred_at DESC))[1],
           (array_agg(host ORDER BY occurred_at DESC))[1], count(*)
    FROM new WHERE outcome = 'allowed' GROUP BY username, protocol ORDER BY username, protocol
    ON CONFLICT (username, protocol) DO UPDATE SET
        first_seen = LEAST(l.first_seen, EXCLUDED.first_seen),
        last_seen = GREATEST(l.last_seen, EXCLUDED.last_seen),
        last_remote_ip = CASE WHEN EXCLUDED.last_seen >= l.last_seen
                              THEN EXCLUDED.last_remote_ip ELSE l.last_remote_ip END,
        last_local_ip = CASE WHEN EXCLUDED.last_seen >= l.last_seen
                             THEN EXCLUDED.last_local_ip ELSE l.last_local_ip END,
        last_host = CASE WHEN EXCLUDED.last_seen >= l.last_seen
                         THEN EXCLUDED.last_host ELSE l.last_host END,
        login_count = l.login_count + EXCLUDED.login_count
    RETURNING 1
), delivered AS (
    INSERT INTO login_alert_deliveries (alert_id, username, delivered_at)
    SELECT d.alert_id, n.username, n.occurred_at
    FROM unnest(%(d_event)s::uuid[], %(d_alert)s::int[]) AS d(event_id, alert_id)
    JOIN new n ON n.event_id = d.event_id
    ORDER BY d.alert_id, n.username
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM folded), (SELECT count(*) FROM delivered)
"""

COLUMNS = ("event_id", "occurred_at", "username", "username_raw", "protocol", "remote_ip",
           "local_ip", "outcome", "rule_id", "auth_mech", "master_user", "auth_user",
           "message", "policy_applied", "host", "session_id")


def pg_params(records: Sequence[LoginRecord]) -> dict[str, list[object]]:
    records = unique_events(records)
    rows = [r.event_row() for r in records]
    params: dict[str, list[object]] = {c: [row[c] for row in rows] for c in COLUMNS}
    params["d_event"] = [r.event_id for r in records for _ in r.alerts_shown]
    params["d_alert"] = [a for r in records for a in r.alerts_shown]
    return params


class SqlAlchemyWriter:
    """Any backend: one SQLAlchemy transaction per batch."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def write(self, records: Sequence[LoginRecord]) -> int:
        with self.engine.begin() as conn:
            return record_logins(conn, records)

    def close(self) -> None:
        pass


class PostgresWriter:
    """PostgreSQL: one prepared statement per batch on an autocommit connection."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._raw = None

    def _conn(self):
        if self._raw is None:
            raw = self.engine.raw_connection()
            raw.driver_connection.autocommit = True
            self._raw = raw
        return self._raw.driver_connection

    def write(self, records: Sequence[LoginRecord]) -> int:
        try:
            row = self._conn().execute(PG_BATCH, pg_params(records), prepare=True).fetchone()
        except Exception:
            self.close()            # a fresh connection next time
            raise
        return int(row[0])

    def close(self) -> None:
        if self._raw is not None:
            try:
                self._raw.invalidate()
            except Exception:  # noqa: BLE001 - it is being thrown away anyway
                pass
            self._raw = None


def writer_for(engine: sa.Engine):
    if engine.dialect.name == "postgresql":
        return PostgresWriter(engine)
    return SqlAlchemyWriter(engine)
