"""Named writes and reads of login records. Parameterized SQL only."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import uuid
from dataclasses import dataclass
from typing import Iterable, Sequence

import sqlalchemy as sa

from .engine import dialect_insert
from .schema import last_logins, login_alert_deliveries, login_events


def text_form(value: bytes) -> tuple[str, bytes | None]:
    """(text to store, exact bytes when the text cannot hold them).

    Valid UTF-8 without NUL is stored as it is. Anything else is shown with
    \\xNN escapes and its exact bytes are kept beside it, so nothing is lost.
    """
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("utf-8", "backslashreplace")
        return text.replace("\x00", "\\x00"), value
    if "\x00" in text:
        return text.replace("\x00", "\\x00"), value
    return text, None


# Longest username text stored as the key of a row. PostgreSQL's btree index
# rows hold at most ~2.7 kB, so a longer username (which Dovecot can send)
# would be refused by the database and block its batch. Longer ones are
# stored as a prefix plus their SHA-256 -- the same name always gives the
# same key -- with the exact bytes beside it in username_raw.
NAME_TEXT_MAX = 1024
_NAME_PREFIX = NAME_TEXT_MAX - 96


def username_text(value: bytes) -> tuple[str, bytes | None]:
    """(key text to store, exact bytes when the text does not hold them).

    Like ``text_form``, and bounded to ``NAME_TEXT_MAX`` UTF-8 bytes. Every
    place that stores or looks up a username by its text uses this.
    """
    text, raw = text_form(value)
    encoded = text.encode("utf-8")
    if len(encoded) <= NAME_TEXT_MAX:
        return text, raw
    prefix = encoded[:_NAME_PREFIX].decode("utf-8", "ignore")
    digest = hashlib.sha256(value).hexdigest()
    return f"{prefix}...[{len(value)} bytes sha256:{digest}]", value


@functools.lru_cache(maxsize=65536)
def normalize_ip(value: bytes | None) -> str | None:
    """An address from the request as canonical text; NULL when unknown.

    2.4 may append an IPv6 zone (``fe80::1%eth0``); ``inet`` has no room for
    it, so it is dropped. Text that is not an address is stored as NULL.
    """
    if not value:
        return None
    text = value.decode("ascii", "replace").split("%", 1)[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


@dataclass(frozen=True)
class LoginRecord:
    """One login as it is stored."""

    event_id: uuid.UUID
    occurred_at: dt.datetime
    username: bytes
    protocol: str
    remote_ip: str | None
    local_ip: str | None
    outcome: str
    rule_id: int | None = None
    auth_mech: bytes | None = None
    master_user: bytes | None = None
    auth_user: bytes | None = None
    alerts_shown: tuple[int, ...] = ()      # show-once alerts this login displayed
    message: str | None = None              # what a refused client was told
    policy_applied: bool = True             # False: decided without rules loaded
    host: str | None = None                 # the mail host (host_name) that saw it

    def event_row(self) -> dict[str, object]:
        name, raw = username_text(self.username)
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "username": name,
            "username_raw": raw,
            "protocol": self.protocol,
            "remote_ip": self.remote_ip,
            "local_ip": self.local_ip,
            "outcome": self.outcome,
            "rule_id": self.rule_id,
            "auth_mech": _opt_text(self.auth_mech),
            "master_user": _opt_text(self.master_user),
            "auth_user": _opt_text(self.auth_user),
            "message": self.message,
            "policy_applied": self.policy_applied,
            "host": self.host,
        }


def unique_events(records: Sequence[LoginRecord]) -> list[LoginRecord]:
    """The records with each event id once (the first copy wins)."""
    seen: set[uuid.UUID] = set()
    out = []
    for rec in records:
        if rec.event_id not in seen:
            seen.add(rec.event_id)
            out.append(rec)
    return out


def _opt_text(value: bytes | None) -> str | None:
    return None if value is None else text_form(value)[0]


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
