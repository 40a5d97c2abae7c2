"""Named writes and reads of login records. Parameterized SQL only."""

from __future__ import annotations

import uuid
from typing import Iterable, Sequence

import sqlalchemy as sa

from ..login import LoginRecord, username_text
from .engine import dialect_insert
from .schema import last_logins, login_alert_deliveries, login_events, login_places


def unique_events(records: Sequence[LoginRecord]) -> list[LoginRecord]:
    """The records with each event id once (the first copy wins)."""
    seen: set[uuid.UUID] = set()
    out = []
    for rec in records:
        if rec.event_id not in seen:
            seen.add(rec.event_id)
            out.append(rec)
    return out


def _seen_before(conn: sa.Connection, row: dict[str, object], same_place: bool) -> bool:
    """An allowed login of this user before this one (from the same place)?

    Asked of last_logins (its first_seen) and of login_places, as the
    PostgreSQL batch does: one primary-key lookup each.
    """
    if not same_place:
        t = last_logins
        cond = [t.c.username == row["username"], t.c.first_seen < row["occurred_at"]]
    else:
        kind, place = place_key(row)
        p = login_places
        cond = [p.c.username == row["username"], p.c.kind == kind, p.c.place == place,
                p.c.first_seen < row["occurred_at"]]
    return conn.execute(sa.select(sa.literal(1)).where(*cond).limit(1)).first() is not None


def place_key(row: dict[str, object]) -> tuple[str, str]:
    """What "the same place" compares, as login_places holds it: the
    country, or without one the ASN (in decimal)."""
    return (("country", row["country"]) if row["country"] is not None  # type: ignore[return-value]
            else ("asn", str(row["asn"])))


def place_rows(rows: Iterable[dict[str, object]]) -> list[dict[str, object]]:
    """The login_places rows of ``rows`` (stored events): the country and the
    ASN of each allowed one, each user and place at its earliest, in key
    order (the order every writer locks them in)."""
    first: dict[tuple[object, str, str], object] = {}
    for row in rows:
        if row["outcome"] != "allowed":
            continue
        for kind, place in (("country", row["country"]), ("asn", row["asn"])):
            if place is None:
                continue
            key = (row["username"], kind, str(place))
            t = first.get(key)
            if t is None or row["occurred_at"] < t:  # type: ignore[operator]
                first[key] = row["occurred_at"]
    return [{"username": u, "kind": k, "place": p, "first_seen": t}
            for (u, k, p), t in sorted(first.items(), key=lambda item: item[0])]  # type: ignore


# The places of the allowed logins stored since :since that login_places
# lacks, or holds at a later time (the upgrade's backfill, restated: the
# migration stands alone). Only those rows are written.
_CATCH_UP_PLACES = """
INSERT INTO login_places (username, kind, place, first_seen)
SELECT a.username, a.kind, a.place, a.first_seen FROM (
    SELECT username, 'country' AS kind, country AS place, min(occurred_at) AS first_seen
    FROM login_events
    WHERE outcome = 'allowed' AND country IS NOT NULL AND occurred_at >= :since
    GROUP BY username, country
    UNION ALL
    SELECT username, 'asn', CAST(asn AS TEXT), min(occurred_at)
    FROM login_events
    WHERE outcome = 'allowed' AND asn IS NOT NULL AND occurred_at >= :since
    GROUP BY username, asn
) a
WHERE NOT EXISTS (SELECT 1 FROM login_places k
                  WHERE k.username = a.username AND k.kind = a.kind AND k.place = a.place
                    AND k.first_seen <= a.first_seen)
"""
_CATCH_UP_CONFLICT = """
ON CONFLICT (username, kind, place) DO UPDATE SET first_seen = excluded.first_seen
    WHERE excluded.first_seen < login_places.first_seen
"""
# On PostgreSQL in the order the writers lock rows in (SQLite: one writer at a time).
_CATCH_UP_BY_DIALECT = {
    "postgresql": (_CATCH_UP_PLACES + 'ORDER BY a.username COLLATE "C", a.kind, a.place'
                   + _CATCH_UP_CONFLICT),
    "sqlite": _CATCH_UP_PLACES + _CATCH_UP_CONFLICT,
}


# One key for the transactions that must not overlap on login_places rows
# they cannot see each other write: the catch-up and `user forget` (which
# could otherwise leave a place the catch-up was adding for a forgotten
# user). "llplac" in ASCII, easy to spot in pg_locks.
PLACES_LOCK_KEY = 0x6C6C706C6163


def places_lock(conn: sa.Connection, wait: bool = True) -> bool:
    """Take PLACES_LOCK_KEY for the transaction (PostgreSQL; SQLite writes
    one at a time anyway); False if ``wait`` is off and another has it."""
    if conn.dialect.name != "postgresql":
        return True
    if wait:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PLACES_LOCK_KEY})
        return True
    return bool(conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"),
                             {"k": PLACES_LOCK_KEY}).scalar())


def catch_up_places(conn: sa.Connection, since) -> int:
    """Add to login_places what the logins stored since ``since`` show and it
    lacks; the rows written (0 when every writer kept it). A login stored
    without its place -- by a daemon of the release before login_places,
    still running on another host after the upgrade, or by hand -- would
    make the user's next login from that place "new"; the daily job runs
    this over the last days. One host at a time (another finds the lock
    taken and leaves it), with a minute for the statement: it reads every
    allowed login since ``since``, longer than the daemon's own bound on a
    statement for a large installation."""
    if not places_lock(conn, wait=False):
        return 0
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SET LOCAL statement_timeout = '60s'"))
    stmt = sa.text(_CATCH_UP_BY_DIALECT.get(conn.dialect.name, _CATCH_UP_BY_DIALECT["sqlite"])
                   ).bindparams(
        sa.bindparam("since", since, type_=login_events.c.occurred_at.type))
    return conn.execute(stmt).rowcount


def flag_new_locations(conn: sa.Connection | None, rows: list[dict[str, object]],
                       seen_before=None) -> None:
    """Set ``new_location`` on each row, as the PostgreSQL batch does in SQL.

    New: an allowed login with a known country (or, without one, ASN), of a
    user with an earlier allowed login, none of them from that place --
    earlier logins in the same batch included. The first login is not new.
    ``seen_before(row, same_place)`` asks the stored history (default: through
    ``conn``; the SQLite writer passes its own connection's query).
    """
    if seen_before is None:
        def seen_before(row: dict[str, object], same_place: bool) -> bool:
            return _seen_before(conn, row, same_place)
    by_time = sorted((r for r in rows if r["outcome"] == "allowed"
                      and (r["country"] is not None or r["asn"] is not None)),
                     key=lambda r: r["occurred_at"])  # type: ignore[arg-type, return-value]
    batch_users: dict[object, object] = {}          # username -> earliest in batch
    for row in rows:
        row["new_location"] = False
        if row["outcome"] == "allowed":
            t = batch_users.get(row["username"])
            if t is None or row["occurred_at"] < t:  # type: ignore[operator]
                batch_users[row["username"]] = row["occurred_at"]
    # every place of the batch's allowed logins -- the country and the ASN of
    # each, as the batch statement's probes of its input see them
    batch_places = {(p["username"], (p["kind"], p["place"])): p["first_seen"]
                    for p in place_rows(rows)}
    for row in by_time:
        at = row["occurred_at"]
        earlier_user = batch_users[row["username"]] < at  # type: ignore[operator]
        earlier_place = batch_places[(row["username"], place_key(row))] < at  # type: ignore
        if earlier_place or seen_before(row, True):
            continue
        row["new_location"] = earlier_user or seen_before(row, False)


def record_logins(conn: sa.Connection, records: Sequence[LoginRecord],
                  flagged: list[uuid.UUID] | None = None) -> int:
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
    flag_new_locations(conn, rows)
    stmt = (dialect_insert(conn, login_events)
            .on_conflict_do_nothing(index_elements=["event_id", "occurred_at"])
            .returning(login_events.c.event_id))
    new_ids = set(conn.execute(stmt, rows).scalars())
    fresh = [row for row in rows if row["event_id"] in new_ids]
    if flagged is not None:
        flagged.extend(row["event_id"] for row in fresh if row["new_location"])  # type: ignore
    _upsert_last_logins(conn, [r for r in fresh if r["outcome"] == "allowed"])
    deliveries = [{"alert_id": a, "username": row["username"], "delivered_at": row["occurred_at"]}
                  for rec, row in zip(records, rows) if row["event_id"] in new_ids
                  for a in rec.alerts_shown]
    if deliveries:
        deliveries.sort(key=lambda d: (d["alert_id"], d["username"]))     # lock order
        conn.execute(dialect_insert(conn, login_alert_deliveries).on_conflict_do_nothing(),
                     deliveries)
    # last, as the batch statement writes them (its places CTE runs after
    # the deliveries): writers lock rows in one order, so they never deadlock
    _upsert_places(conn, place_rows(fresh))
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
                "last_host": row["host"], "last_country": row["country"], "login_count": 1,
            }
            continue
        cur["login_count"] += 1  # type: ignore[operator]
        cur["first_seen"] = min(cur["first_seen"], row["occurred_at"])  # type: ignore
        if row["occurred_at"] >= cur["last_seen"]:  # type: ignore[operator]
            cur["last_seen"] = row["occurred_at"]
            cur["last_remote_ip"] = row["remote_ip"]
            cur["last_local_ip"] = row["local_ip"]
            cur["last_host"] = row["host"]
            cur["last_country"] = row["country"]
    # In key order: concurrent writers (one daemon per mail host) then lock
    # the same users' rows in the same order and cannot deadlock.
    return [folded[k] for k in sorted(folded)]


def _upsert_places(conn: sa.Connection, rows: list[dict[str, object]]) -> None:
    """Add the places; a stored one keeps the earlier of the two times."""
    if not rows:
        return
    stmt = dialect_insert(conn, login_places)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=["username", "kind", "place"],
        set_={"first_seen": stmt.excluded.first_seen},
        where=stmt.excluded.first_seen < login_places.c.first_seen), rows)


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
            "last_country": sa.case((newer, ins.excluded.last_country),
                                    else_=t.c.last_country),
            "login_count": t.c.login_count + ins.excluded.login_count,
        },
    )
    conn.execute(stmt, _fold(rows))


def previous_login(conn: sa.Connection, username: bytes) -> tuple[str, str, str] | None:
    """(time, address, country) of the user's last allowed login, any protocol;
    one primary-key range read of last_logins. None: never logged in."""
    t = last_logins
    name = username_text(username)[0]
    row = conn.execute(sa.select(t.c.last_seen, t.c.last_remote_ip, t.c.last_country)
                       .where(t.c.username == name).order_by(t.c.last_seen.desc())
                       .limit(1)).first()
    if row is None:
        return None
    when = row.last_seen.strftime("%Y-%m-%d %H:%M:%S UTC")
    return when, str(row.last_remote_ip or ""), row.last_country or ""
