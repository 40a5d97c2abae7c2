"""Named writes and reads of login records. Parameterized SQL only."""

from __future__ import annotations

import uuid
from typing import Iterable, Sequence

import sqlalchemy as sa

from ..login import LoginRecord
from .engine import dialect_insert
from .schema import last_logins, login_alert_deliveries, login_events


def unique_events(records: Sequence[LoginRecord]) -> list[LoginRecord]:
    """The records with each event id once (the first copy wins)."""
    seen: set[uuid.UUID] = set()
    out = []
    for rec in records:
        if rec.event_id not in seen:
            seen.add(rec.event_id)
            out.append(rec)
    return out


def record_logins(conn: sa.Connection, records: Sequence[LoginRecord]) -> int:
    """Store the events and fold them into last_logins; return how many were new.

    Idempotent: an event id already stored is skipped, and only new allowed
    events count towards last_logins, so a replay changes nothing. The fold
    is decided by what the INSERT itself returns, in the same transaction,
    so a record written twice (a slow commit that also went to the spool)
    counts once -- even twice within one batch.
    """
    records = unique_events(records)
    if not records:
        return 0
    rows = [r.event_row() for r in records]
    stmt = (dialect_insert(conn, login_events)
            .on_conflict_do_nothing(index_elements=["event_id", "occurred_at"])
            .returning(login_events.c.event_id))
    new_ids = set(conn.execute(stmt, rows).scalars())
    fresh = [row for row in rows if row["event_id"] in new_ids]
    _upsert_last_logins(conn, [r for r in fresh if r["outcome"] == "allowed"])
    deliveries = [{"alert_id": a, "username": row["username"], "delivered_at": row["occurred_at"]}
                  for rec, row in zip(records, rows) if row["event_id"] in new_ids
                  for a in rec.alerts_shown]
    if deliveries:
        deliveries.sort(key=lambda d: (d["alert_id"], d["username"]))     # lock order
        conn.execute(dialect_insert(conn, login_alert_deliveries).on_conflict_do_nothing(),
                     deliveries)
    return len(fresh)


def _fold(rows: Iterable[dict[str, object]]) -> list[dict[str, object]]:
    """One last_logins row per (username, protocol) of this batch."""
    folded: dict[tuple[object, object], dict[str, object]] = {}
    for row in rows:
        key = (row["username"], row["protocol"])
        cur = folded.get(key)
        if cur is None:
            folded[key] = {
                "username": row["username"], "protocol": row["protocol"],
                "username_raw": row["username_raw"],
                "first_seen": row["occurred_at"], "last_seen": row["occurred_at"],
                "last_remote_ip": row["remote_ip"], "last_local_ip": row["local_ip"],
                "last_host": row["host"], "login_count": 1,
            }
            continue
        cur["login_count"] += 1  # type: ignore[operator]
        cur["first_seen"] = min(cur["first_seen"], row["occurred_at"])  # type: ignore
        if row["occurred_at"] >= cur["last_seen"]:  # type: ignore[operator]
            cur["last_seen"] = row["occurred_at"]
            cur["last_remote_ip"] = row["remote_ip"]
            cur["last_local_ip"] = row["local_ip"]
            cur["last_host"] = row["host"]
    # In key order: concurrent writers (one daemon per mail host) then lock
    # the same users' rows in the same order and cannot deadlock.
    return [folded[k] for k in sorted(folded)]


def _upsert_last_logins(conn: sa.Connection, rows: list[dict[str, object]]) -> None:
    if not rows:
        return
    t = last_logins
    ins = dialect_insert(conn, t)
    newer = ins.excluded.last_seen >= t.c.last_seen
    stmt = ins.on_conflict_do_update(
        index_elements=["username", "protocol"],
        set_={
            "first_seen": sa.case((ins.excluded.first_seen < t.c.first_seen,
                                   ins.excluded.first_seen), else_=t.c.first_seen),
            "last_seen": sa.case((newer, ins.excluded.last_seen), else_=t.c.last_seen),
            "last_remote_ip": sa.case((newer, ins.excluded.last_remote_ip),
                                      else_=t.c.last_remote_ip),
            "last_local_ip": sa.case((newer, ins.excluded.last_local_ip),
                                     else_=t.c.last_local_ip),
            "last_host": sa.case((newer, ins.excluded.last_host), else_=t.c.last_host),
            "login_count": t.c.login_count + ins.excluded.login_count,
        },
    )
    conn.execute(stmt, _fold(rows))
