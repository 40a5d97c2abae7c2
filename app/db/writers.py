"""Batch writers for the recorder: one per backend.

PostgreSQL gets a fast path: the whole batch -- events, last_logins fold,
alert deliveries -- is one prepared statement over arrays, run on a
dedicated autocommit connection. A single statement is its own transaction,
so a batch costs one round trip and one WAL flush, whatever its size.
SQLite gets one too: the same three writes as the SQLAlchemy path, as
plain SQL on a dedicated sqlite3 connection in one ``BEGIN IMMEDIATE``
transaction, values converted by the columns' own SQLAlchemy types (so the
stored text is the same). Anything else uses the SQLAlchemy path
(app/db/store.record_logins), which is also what imports and replays use;
all give the same rows (tests/test_store.py runs against each).
"""

from __future__ import annotations

import logging
import re
import select
import time
import uuid
from typing import Sequence

import psycopg
import sqlalchemy as sa
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer

from ..login import LoginRecord
from ..logs import first_line, show
from .engine import ReplyBound
from .schema import last_logins, login_alert_deliveries, login_events
from .store import _fold, flag_new_locations, place_key, place_rows, record_logins, unique_events

log = logging.getLogger("lastlogin.recorder")

# Parameters are arrays, one element per record (unnest keeps them in step).
PG_BATCH = """
WITH input AS (
    SELECT * FROM unnest(%(event_id)s::uuid[], %(occurred_at)s::timestamptz[],
                         %(username)s::text[], %(username_raw)s::bytea[],
                         %(protocol)s::text[], %(remote_ip)s::inet[], %(local_ip)s::inet[],
                         %(outcome)s::text[], %(rule_id)s::int[], %(auth_mech)s::text[],
                         %(master_user)s::text[], %(auth_user)s::text[],
                         %(message)s::text[], %(policy_applied)s::bool[], %(host)s::text[],
                         %(country)s::text[], %(asn)s::bigint[], %(session_id)s::text[])
        AS t(event_id, occurred_at, username, username_raw, protocol, remote_ip, local_ip,
             outcome, rule_id, auth_mech, master_user, auth_user, message, policy_applied,
             host, country, asn, session_id)
), located AS (
    -- new_location (app/db/store.flag_new_locations says the same in Python):
    -- an allowed login with a known place, of a user who logged in before
    -- (last_logins, or earlier in this batch), never from that country -- or,
    -- without a country, that ASN (login_places, or earlier in this batch).
    -- Unlocated logins skip the probes. Each probe is one primary-key
    -- lookup, however many partitions login_events has.
    SELECT i.*,
           CASE WHEN i.outcome <> 'allowed' OR (i.country IS NULL AND i.asn IS NULL)
                THEN false
                -- the first login a user ever makes is not new
                WHEN NOT (EXISTS (SELECT 1 FROM last_logins p
                                  WHERE p.username = i.username
                                    AND p.first_seen < i.occurred_at)
                          OR EXISTS (SELECT 1 FROM input b
                                     WHERE b.username = i.username AND b.outcome = 'allowed'
                                       AND b.occurred_at < i.occurred_at))
                THEN false
                WHEN i.country IS NOT NULL
                THEN NOT EXISTS (SELECT 1 FROM login_places p
                                 WHERE p.username = i.username AND p.kind = 'country'
                                   AND p.place = i.country AND p.first_seen < i.occurred_at)
                     AND NOT EXISTS (SELECT 1 FROM input b
                                     WHERE b.username = i.username AND b.country = i.country
                                       AND b.outcome = 'allowed'
                                       AND b.occurred_at < i.occurred_at)
                ELSE NOT EXISTS (SELECT 1 FROM login_places p
                                 WHERE p.username = i.username AND p.kind = 'asn'
                                   AND p.place = i.asn::text AND p.first_seen < i.occurred_at)
                     AND NOT EXISTS (SELECT 1 FROM input b
                                     WHERE b.username = i.username AND b.asn = i.asn
                                       AND b.outcome = 'allowed'
                                       AND b.occurred_at < i.occurred_at)
           END AS new_location
    FROM input i
), new AS (
    -- Only the rows this statement inserts are folded below: a record
    -- written twice (spooled and committed late) counts once.
    INSERT INTO login_events (event_id, occurred_at, username, username_raw, protocol,
                              remote_ip, local_ip, outcome, rule_id, auth_mech,
                              master_user, auth_user, message, policy_applied, host,
                              country, asn, session_id, new_location)
    SELECT * FROM located
    ON CONFLICT (event_id, occurred_at) DO NOTHING
    RETURNING event_id, occurred_at, username, username_raw, protocol, remote_ip, local_ip,
              outcome, host, country, asn, new_location
), folded AS (
    -- ORDER BY: writers on several mail hosts lock the same users' rows in
    -- the same order, so concurrent batches wait for each other, never deadlock.
    -- COLLATE "C": code point order, the order record_logins sorts in
    -- Python; the database's own collation may differ (ICU, en_US ...).
    INSERT INTO last_logins AS l (username, protocol, username_raw, first_seen, last_seen,
                                  last_remote_ip, last_local_ip, last_host, last_country,
                                  login_count)
    SELECT username, protocol, (array_agg(username_raw))[1], min(occurred_at), max(occurred_at),
           (array_agg(remote_ip ORDER BY occurred_at DESC))[1],
           (array_agg(local_ip ORDER BY occurred_at DESC))[1],
           (array_agg(host ORDER BY occurred_at DESC))[1],
           (array_agg(country ORDER BY occurred_at DESC))[1], count(*)
    FROM new WHERE outcome = 'allowed' GROUP BY username, protocol
    ORDER BY username COLLATE "C", protocol
    ON CONFLICT (username, protocol) DO UPDATE SET
        first_seen = LEAST(l.first_seen, EXCLUDED.first_seen),
        last_seen = GREATEST(l.last_seen, EXCLUDED.last_seen),
        last_remote_ip = CASE WHEN EXCLUDED.last_seen >= l.last_seen
                              THEN EXCLUDED.last_remote_ip ELSE l.last_remote_ip END,
        last_local_ip = CASE WHEN EXCLUDED.last_seen >= l.last_seen
                             THEN EXCLUDED.last_local_ip ELSE l.last_local_ip END,
        last_host = CASE WHEN EXCLUDED.last_seen >= l.last_seen
                         THEN EXCLUDED.last_host ELSE l.last_host END,
        last_country = CASE WHEN EXCLUDED.last_seen >= l.last_seen
                            THEN EXCLUDED.last_country ELSE l.last_country END,
        login_count = l.login_count + EXCLUDED.login_count
    RETURNING 1
), delivered AS (
    INSERT INTO login_alert_deliveries (alert_id, username, delivered_at)
    SELECT d.alert_id, n.username, n.occurred_at
    FROM unnest(%(d_event)s::uuid[], %(d_alert)s::int[]) AS d(event_id, alert_id)
    JOIN new n ON n.event_id = d.event_id
    ORDER BY d.alert_id, n.username COLLATE "C"
    ON CONFLICT DO NOTHING
    RETURNING 1
), placed AS (
    -- login_places: the country and the ASN of each allowed login inserted,
    -- at the earliest time; a place stored at that time or before is left
    -- alone (not even locked). Not read below: PostgreSQL runs it anyway,
    -- after the CTEs that are, so every writer locks rows in the same order.
    -- The stored time is a scalar subquery, one primary-key lookup per
    -- place: as NOT EXISTS, the generic plan made it a hash anti-join that
    -- read the whole table for each commit while the table was small.
    INSERT INTO login_places AS s (username, kind, place, first_seen)
    SELECT n.username, v.kind, v.place, min(n.occurred_at)
    FROM new n CROSS JOIN LATERAL (VALUES ('country', n.country), ('asn', n.asn::text))
        AS v(kind, place)
    WHERE n.outcome = 'allowed' AND v.place IS NOT NULL
      AND COALESCE((SELECT k.first_seen FROM login_places k
                    WHERE k.username = n.username AND k.kind = v.kind AND k.place = v.place)
                   > n.occurred_at, true)
    GROUP BY n.username, v.kind, v.place ORDER BY n.username COLLATE "C", v.kind, v.place
    ON CONFLICT (username, kind, place) DO UPDATE SET first_seen = EXCLUDED.first_seen
        WHERE EXCLUDED.first_seen < s.first_seen
)
SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM folded), (SELECT count(*) FROM delivered),
       (SELECT array_agg(event_id) FROM new WHERE new_location)
"""

# As sent: without comments and runs of blanks (the writers convert and
# prepare each statement once per connection: see _positional).
PG_BATCH = " ".join(re.sub(r"--[^\n]*", "", PG_BATCH).split())

COLUMNS = ("event_id", "occurred_at", "username", "username_raw", "protocol", "remote_ip",
           "local_ip", "outcome", "rule_id", "auth_mech", "master_user", "auth_user",
           "message", "policy_applied", "host", "country", "asn", "session_id")

# A batch of one login -- every commit at low load -- as the same statement
# with its input as one row of plain values instead of eighteen one-element
# arrays: everything after the input is the same text, and the row's
# columns are PG_BATCH's, in the order of its ``AS t(...)`` list (the INSERT
# takes them by position), so both store the same rows by construction.
# Adapting the arrays was about 40 % of the writer's CPU for such a commit.
def _one_row_statement(batch: str) -> str:
    found = list(re.finditer(r"WITH input AS \( SELECT \* FROM unnest\((.*?)\) "
                             r"AS t\(([^)]*)\) \)", batch))
    if len(found) != 1:
        raise RuntimeError("PG_BATCH's input no longer has the shape PG_ONE replaces")
    m = found[0]
    params = re.findall(r"%\((\w+)\)s::(\w+)\[\]", m.group(1))
    names = [n.strip() for n in m.group(2).split(",")]
    if [p for p, _ in params] != names or tuple(names) != COLUMNS:
        raise RuntimeError("PG_BATCH's arrays, its AS t(...) list and COLUMNS disagree")
    row = ", ".join(f"%({p})s::{t} AS {n}" for (p, t), n in zip(params, names))
    return f"{batch[:m.start()]}WITH input AS (SELECT {row}){batch[m.end():]}"


PG_ONE = _one_row_statement(PG_BATCH)

# The located CTE's first branch, as the statement says it and as the writer
# tests it in Python (``unlocated``): a login it takes is never a new location.
_UNLOCATED_SQL = "WHEN i.outcome <> 'allowed' OR (i.country IS NULL AND i.asn IS NULL) THEN false"


def unlocated(record: LoginRecord) -> bool:
    """True when PG_BATCH's located CASE takes its first branch for ``record``."""
    return record.outcome != "allowed" or (record.country is None and record.asn is None)


# A batch of one such login -- every login without GeoIP, every refused one --
# as PG_ONE with that CASE reduced to the branch it takes: ``false``. The
# probes of login_events are then not in the plan at all: PostgreSQL set
# them up, over every partition, at each execution even when the CASE never
# ran them -- about a fifth of its CPU for the commit, growing with the
# partitions (one more each month). Derived from PG_ONE's text like PG_ONE
# from PG_BATCH's; the daemon refuses to start if the CASE's first branch is
# no longer what ``unlocated`` tests.
def _unlocated_statement(one: str) -> str:
    found = list(re.finditer(r"located AS \( SELECT i\.\*, (CASE (WHEN .*?) WHEN NOT .*? END) "
                             r"AS new_location FROM input i \)", one))
    if len(found) != 1 or found[0].group(2) != _UNLOCATED_SQL:
        raise RuntimeError("PG_ONE's located CASE no longer starts with the branch "
                           "writers.unlocated tests")
    m = found[0]
    return f"{one[:m.start(1)]}false{one[m.end(1):]}"


PG_ONE_UNLOCATED = _unlocated_statement(PG_ONE)

# A batch of such logins without alerts shown -- under load without GeoIP,
# nearly every batch -- as PG_BATCH with the located CASE reduced to
# ``false`` and without the deliveries and places CTEs, which write nothing
# for it (no alert to deliver; only an allowed login with a place adds a
# place). PostgreSQL still set them up and ran them for each batch: about
# 9 % of its CPU per login at 64 logins a batch and 15 % at 8, mostly a
# cost per statement (docs/performance.md, session 9). Derived from
# PG_BATCH's text like PG_ONE_UNLOCATED from PG_ONE's; the same rows by
# construction, the same reply (0 deliveries, no new location). As with
# the lean one-login statements, a place that an operator's trigger on
# login_events adds to a login stored without one is not kept in
# login_places (PG_BATCH would read it back from the stored row).
_DELIVERED_AND_PLACED = (r", delivered AS \( INSERT INTO login_alert_deliveries .*? RETURNING 1 \), "
                         r"placed AS \( INSERT INTO login_places .*? \) (SELECT \(SELECT count\(\*\) "
                         r"FROM new\), \(SELECT count\(\*\) FROM folded\), )\(SELECT count\(\*\) "
                         r"FROM delivered\),")


# Why they write nothing for such a batch, as PG_BATCH says it (pinned):
# deliveries only for the alerts shown, places only for allowed logins with one.
_DELIVERED_ONLY = ("FROM unnest(%(d_event)s::uuid[], %(d_alert)s::int[]) AS d(event_id, alert_id) "
                   "JOIN new n ON n.event_id = d.event_id")
_PLACED_ONLY = "WHERE n.outcome = 'allowed' AND v.place IS NOT NULL AND"


def _unlocated_batch_statement(batch: str) -> str:
    lean = _unlocated_statement(batch)
    found = list(re.finditer(_DELIVERED_AND_PLACED, lean))
    ctes = re.findall(r"(?:WITH|,) (\w+) AS \( ", batch)
    if len(found) != 1 or ctes != ["input", "located", "new", "folded", "delivered", "placed"]:
        raise RuntimeError("PG_BATCH no longer ends with the deliveries and places CTEs and "
                           "the reply the unlocated batch leaves them out of")
    m = found[0]
    dropped, rest = m.group(0), lean[m.end():]
    if (dropped.count(_DELIVERED_ONLY) != 1 or dropped.count(_PLACED_ONLY) != 1
            or re.search(r"\b(delivered|placed)\b", rest)):
        raise RuntimeError("PG_BATCH's deliveries or places may write for an unlocated login "
                           "without alerts, or its reply reads them")
    return f"{lean[:m.start()]} {m.group(1)}0,{rest}"


PG_BATCH_UNLOCATED = _unlocated_batch_statement(PG_BATCH)

_LAST_COLUMNS = ("username", "protocol", "username_raw", "first_seen", "last_seen",
                 "last_remote_ip", "last_local_ip", "last_host", "last_country", "login_count")
# PG_BATCH's fold, as it reads the rows its insert returned (pinned: a fold
# that changes there must change in the lean statements too) ...
_FOLD_OF_BATCH = ("SELECT username, protocol, (array_agg(username_raw))[1], min(occurred_at), "
                  "max(occurred_at), (array_agg(remote_ip ORDER BY occurred_at DESC))[1], "
                  "(array_agg(local_ip ORDER BY occurred_at DESC))[1], "
                  "(array_agg(host ORDER BY occurred_at DESC))[1], "
                  "(array_agg(country ORDER BY occurred_at DESC))[1], count(*) "
                  "FROM new WHERE outcome = 'allowed' GROUP BY username, protocol "
                  "ORDER BY username COLLATE \"C\", protocol")
# ... and what it makes of one row.
_FOLD_OF_ONE = ("SELECT username, protocol, username_raw, occurred_at, occurred_at, remote_ip, "
                "local_ip, host, country, 1 FROM new WHERE outcome = 'allowed'")
_FOLD_READS = "event_id, username, protocol, username_raw, occurred_at, remote_ip, local_ip, " \
              "host, country, asn, outcome"
# PG_BATCH's new-location test (pinned too): for one login -- allowed, with a
# place, so past the first branch (``one_statement`` picks) -- its probes of
# the input find nothing, and the country branch or the ASN one is taken by
# whether the login has a country: PG_LEAN_COUNTRY and PG_LEAN_ASN below.
_NEW_LOCATION_OF_BATCH = (
    "CASE WHEN i.outcome <> 'allowed' OR (i.country IS NULL AND i.asn IS NULL) THEN false "
    "WHEN NOT (EXISTS (SELECT 1 FROM last_logins p WHERE p.username = i.username "
    "AND p.first_seen < i.occurred_at) "
    "OR EXISTS (SELECT 1 FROM input b WHERE b.username = i.username AND b.outcome = 'allowed' "
    "AND b.occurred_at < i.occurred_at)) THEN false "
    "WHEN i.country IS NOT NULL THEN NOT EXISTS (SELECT 1 FROM login_places p "
    "WHERE p.username = i.username AND p.kind = 'country' AND p.place = i.country "
    "AND p.first_seen < i.occurred_at) AND NOT EXISTS (SELECT 1 FROM input b "
    "WHERE b.username = i.username AND b.country = i.country AND b.outcome = 'allowed' "
    "AND b.occurred_at < i.occurred_at) "
    "ELSE NOT EXISTS (SELECT 1 FROM login_places p WHERE p.username = i.username "
    "AND p.kind = 'asn' AND p.place = i.asn::text AND p.first_seen < i.occurred_at) "
    "AND NOT EXISTS (SELECT 1 FROM input b WHERE b.username = i.username AND b.asn = i.asn "
    "AND b.outcome = 'allowed' AND b.occurred_at < i.occurred_at) END")


# The commonest commit of all -- one login without a place (no GeoIP, or a
# refused one) and without alerts shown -- as the plain statements it comes
# down to: no input CTE to aggregate, no deliveries, no result row. The
# command tag's count is what was inserted: the login_events row of a
# refused login, the last_logins row a new allowed login folds into (an
# operator's trigger on last_logins that suppresses the row would make it
# 0; nothing but the tests reads it). About a quarter less of PostgreSQL's
# CPU for that commit than PG_ONE_UNLOCATED. An allowed login with a place
# gets the same shape, with its new-location test and a result row.
# Derived from PG_BATCH's text -- its parameters and casts, its columns and
# conflict targets, the fold's ON CONFLICT clause, the probes -- and the
# fold reads what the insert returned, as PG_BATCH's does (an operator's
# trigger that changes the stored row changes the fold alike). What is
# said anew here -- the fold of one row, the new-location test for one
# row -- sits beside the batch's own, which is pinned (the import fails
# when PG_BATCH changes there); tests/test_store.py stores the same rows
# and flags through every path.
def _lean_statements(batch: str) -> tuple[str, str, str, str]:
    """(for an allowed login, for any other) -- each login unlocated and
    without alerts shown -- and (with a country, with an ASN only) for an
    allowed login with a place and without alerts shown."""
    casts = dict(re.findall(r"%\((\w+)\)s::(\w+)\[\]", batch))
    if any(c not in casts for c in COLUMNS):
        raise RuntimeError("PG_BATCH no longer takes every column as a parameter")
    ctes = re.findall(r"(?:WITH|,) (\w+) AS \( ", batch)
    events = re.search(r"INSERT INTO login_events \(([^)]*)\) SELECT \* FROM located "
                       r"(ON CONFLICT \(event_id, occurred_at\) DO NOTHING) RETURNING", batch)
    fold = re.search(r"INSERT INTO last_logins AS l \(([^)]*)\) (SELECT .*?) "
                     r"(ON CONFLICT \(username, protocol\) DO UPDATE SET .*?) RETURNING 1 \)",
                     batch)
    placed = re.search(r"placed AS \( (INSERT INTO login_places .*?) \) SELECT", batch)
    if ctes != ["input", "located", "new", "folded", "delivered", "placed"] or (
            events is None or placed is None) or (
            fold is None or fold.group(2) != _FOLD_OF_BATCH or " WHERE " in fold.group(3)):
        raise RuntimeError("PG_BATCH no longer has the shape the lean statements take")
    event_columns = [c.strip() for c in events.group(1).split(",")]
    last_columns = tuple(c.strip() for c in fold.group(1).split(","))
    if event_columns != [*COLUMNS, "new_location"] or last_columns != _LAST_COLUMNS:
        raise RuntimeError("PG_BATCH's insert columns are not the lean statements' columns")

    def value(name: str) -> str:
        return f"%({name})s::{casts[name]}"

    def insert(new_location: str) -> str:
        return (f"INSERT INTO login_events ({events.group(1)}) "
                f"VALUES ({', '.join(value(c) for c in COLUMNS)}, {new_location}) "
                f"{events.group(2)}")

    last = f"INSERT INTO last_logins AS l ({fold.group(1)}) {_FOLD_OF_ONE} {fold.group(3)}"
    allowed = f"WITH new AS ({insert('false')} RETURNING {_FOLD_READS}) {last}"
    # A login with a place: the located CASE's probes of the stored history
    # with the login's own values as parameters (for a batch of one, its
    # probes of the input itself find nothing: the only row is not earlier
    # than itself). PostgreSQL then probes each partition's index directly
    # instead of setting the correlated probes up over every partition at
    # each execution, which grew with the partitions (+28 % of its CPU at
    # 17 against 5, session 6's measurement).
    located_case = re.search(r"located AS \( SELECT i\.\*, (CASE .*? END) AS new_location "
                             r"FROM input i \)", batch)
    if located_case is None or located_case.group(1) != _NEW_LOCATION_OF_BATCH:
        raise RuntimeError("PG_BATCH's new-location test is not the one the lean statements restate")
    probes = re.findall(r"EXISTS \(SELECT 1 FROM ((?:last_logins|login_places) p WHERE "
                        r"p\.username = i\.username AND (?:p\.kind = '(country|asn)' AND "
                        r"p\.place = i\.\w+(?:::text)? AND )?p\.first_seen < i\.occurred_at)\)",
                        batch)
    if [place for _, place in probes] != ["", "country", "asn"]:
        raise RuntimeError("PG_BATCH's new-location probes are not the ones the lean statements take")
    first, by_country, by_asn = (
        "EXISTS (SELECT 1 FROM "
        + re.sub(r"\bi\.(\w+)", lambda m: value(m.group(1)), cond) + ")" for cond, _ in probes)

    # The places: PG_BATCH's own CTE, as it is (for one row it inserts one
    # or two rows, or none).
    def located(probe: str) -> str:
        new = insert(f"CASE WHEN NOT {first} THEN false ELSE NOT {probe} END")
        return (f"WITH new AS ({new} RETURNING {_FOLD_READS}, new_location), "
                f"folded AS ({last} RETURNING 1), placed AS ({placed.group(1)}) "
                f"SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM folded), 0, "
                f"(SELECT array_agg(event_id) FROM new WHERE new_location)")
    return allowed, insert("false"), located(by_country), located(by_asn)


PG_LEAN_ALLOWED, PG_LEAN_OTHER, PG_LEAN_COUNTRY, PG_LEAN_ASN = _lean_statements(PG_BATCH)


def pg_params(records: Sequence[LoginRecord]) -> dict[str, object]:
    """PG_BATCH's parameters: one array per column."""
    records = unique_events(records)
    rows = [r.event_row() for r in records]
    params: dict[str, object] = {c: [row[c] for row in rows] for c in COLUMNS}
    params["d_event"] = [r.event_id for r in records for _ in r.alerts_shown]
    params["d_alert"] = [a for r in records for a in r.alerts_shown]
    return params


def pg_params_one(record: LoginRecord) -> dict[str, object]:
    """PG_ONE's parameters: the one login's values as they are."""
    params: dict[str, object] = record.event_row()
    params["d_event"] = [record.event_id] * len(record.alerts_shown)
    params["d_alert"] = list(record.alerts_shown)
    return params


class SqlAlchemyWriter:
    """Any backend: one SQLAlchemy transaction per batch."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def write(self, records: Sequence[LoginRecord],
              flagged: list[uuid.UUID] | None = None) -> int:
        with self.engine.begin() as conn:
            return record_logins(conn, records, flagged)

    def close(self) -> None:
        pass


class _OwnConnection:
    """A writer on a DBAPI connection of its own, thrown away on any error."""

    _raw = None

    def close(self) -> None:
        if self._raw is not None:
            try:
                self._raw.invalidate()
            except Exception:  # noqa: BLE001 - it is being thrown away anyway
                pass
            self._raw = None


def _positional(statement: str) -> tuple[bytes, tuple[str, ...]]:
    """``statement`` with its ``%(name)s`` placeholders as libpq's ``$n``, and
    the names in the order of their numbers."""
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    text = re.sub(r"%\((\w+)\)s", number, statement)
    if "%" in text:
        raise RuntimeError("a statement the writer prepares has a % that is not a parameter")
    return text.encode(), tuple(names)


# The writer's three statements, prepared by name on its connection when it
# opens. Every parameter is cast in the text (``$1::uuid``, ``$2::uuid[]``
# ...), so PostgreSQL takes its type from the cast and one prepared
# statement serves every login, NULLs and any size of integer included.
_ONE, _UNLOCATED, _BATCH = b"lastlogin_one", b"lastlogin_one_unlocated", b"lastlogin_batch"
_BATCH_UNLOCATED = b"lastlogin_batch_unlocated"
_LEAN_ALLOWED, _LEAN_OTHER = b"lastlogin_lean_allowed", b"lastlogin_lean_other"
_LEAN_COUNTRY, _LEAN_ASN = b"lastlogin_lean_country", b"lastlogin_lean_asn"
_PREPARED = {_ONE: _positional(PG_ONE), _UNLOCATED: _positional(PG_ONE_UNLOCATED),
             _BATCH: _positional(PG_BATCH), _BATCH_UNLOCATED: _positional(PG_BATCH_UNLOCATED),
             _LEAN_ALLOWED: _positional(PG_LEAN_ALLOWED),
             _LEAN_OTHER: _positional(PG_LEAN_OTHER), _LEAN_COUNTRY: _positional(PG_LEAN_COUNTRY),
             _LEAN_ASN: _positional(PG_LEAN_ASN)}


def one_statement(record: LoginRecord) -> bytes:
    """The prepared statement for a batch of ``record`` alone: a lean one
    unless it showed alerts (whose deliveries only PG_ONE's CTE writes)."""
    if record.alerts_shown:
        return _UNLOCATED if unlocated(record) else _ONE
    if unlocated(record):
        return _LEAN_ALLOWED if record.outcome == "allowed" else _LEAN_OTHER
    return _LEAN_COUNTRY if record.country is not None else _LEAN_ASN


class PostgresWriter(_OwnConnection):
    """PostgreSQL: one prepared statement per batch on an autocommit connection.

    The statement runs through psycopg's libpq layer (``psycopg.pq``): the
    parameters dumped as text by the connection's own adapters (a
    ``Transformer``, as a cursor dumps them), ``PQexecPrepared`` (which lets
    go of the GIL while it waits), the one result row loaded by the same
    adapters. A cursor's execute costs about twice the Python for the same
    bytes on the wire, and this is the writer's one statement, run for
    every commit.
    """

    one_row_statement = True    # a batch of one as PG_ONE (the tests also run it off)

    def __init__(self, engine: sa.Engine, bound: ReplyBound | None = None) -> None:
        self.engine = engine
        # How long to wait for the server's reply before a cancel request,
        # then before the connection is dropped as gone; None: as long as it takes.
        self.bound = bound
        self._raw = None
        self._tx: Transformer | None = None

    def _conn(self) -> psycopg.Connection:
        if self._raw is None:
            raw = self.engine.raw_connection()
            try:
                conn = raw.driver_connection
                conn.autocommit = True
                # One plan for every batch: left to choose, PostgreSQL keeps
                # planning the statement afresh for each commit (its custom
                # plans look cheaper than a generic one over the partitions),
                # ~1.3 ms of its CPU per commit; the generic plan prunes
                # partitions when it runs. This connection is the writer's
                # own, never pooled again.
                conn.execute("SET plan_cache_mode = force_generic_plan")
                for name, (text, _) in _PREPARED.items():
                    res = conn.pgconn.prepare(name, text)
                    if res.status != pq.ExecStatus.COMMAND_OK:
                        raise _error(conn, res)
                self._tx = Transformer(conn)
            except Exception:
                raw.invalidate()
                raise
            self._raw = raw
        return self._raw.driver_connection

    def close(self) -> None:
        self._tx = None
        super().close()

    def write(self, records: Sequence[LoginRecord],
              flagged: list[uuid.UUID] | None = None) -> int:
        """Store a batch; ``flagged`` gets the ids of the new locations among it."""
        for attempt in (1, 2):
            try:
                name, values = self.statement(records)
                new, located = self.outcome(self.reply(self._run(name, values)))
                break
            except pg_errors.InvalidSqlStatementName:
                # Our statements are gone from the session (DEALLOCATE ALL,
                # a pooler that moved us): once more on a new connection;
                # twice is the setup's fault, an outage (recorder.AWAY_STATES).
                self.close()
                if attempt == 2:
                    raise
            except Exception:
                if not self.healthy():
                    self.close()    # a fresh connection next time
                raise
        if flagged is not None:
            flagged.extend(located)
        return new

    def _run(self, name: bytes, values: list) -> list[pq.abc.PGresult]:
        """Run the prepared statement; its results. With no reply by the
        bound's deadline, a cancel request; with none after that either, the
        connection is dropped and the error is an OperationalError (the
        outcome is unknown: the statement's ON CONFLICT stores a batch that
        was committed after all once, when it is sent again)."""
        pgconn = self._conn().pgconn
        bound = self.bound
        if bound is None:
            return [pgconn.exec_prepared(name, values)]     # lets go of the GIL
        give_up = time.monotonic() + bound.deadline
        cancelled = False
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN | select.POLLOUT)
        results = []
        pgconn.nonblocking = 1              # (PQexec, above, acts blocking on it anyway)
        pgconn.send_query_prepared(name, values)
        sending = True
        while True:
            if sending and not pgconn.flush():
                sending = False
                poller.modify(pgconn.socket, select.POLLIN)
            if not sending and not pgconn.is_busy():
                res = pgconn.get_result()
                if res is None:
                    return results
                results.append(res)
                continue
            left = give_up - time.monotonic()
            if left > 0 and poller.poll(left * 1000):         # (poll lets go of the GIL)
                pgconn.consume_input()
            elif not cancelled:
                cancelled = True
                cancel = cancel_overdue(pgconn, bound)
                if cancel is not None:
                    try:
                        send_cancel(cancel, bound.grace)
                    except Exception as exc:  # noqa: BLE001 - the wait below decides
                        cancel_failed(exc)
                give_up = time.monotonic() + bound.grace
            else:
                self.close()
                raise psycopg.OperationalError(
                    f"no reply from the server within {bound.deadline:g}s, nor after a cancel")

    def reply(self, results: list[pq.abc.PGresult]) -> pq.abc.PGresult:
        """The one result of a statement, or its error."""
        if len(results) == 1 and results[0].status in _DONE:
            return results[0]
        bad = next((r for r in results if r.status not in _DONE), None)
        if bad is None:
            raise psycopg.OperationalError(f"{len(results)} results for one statement")
        raise _error(self._raw.driver_connection if self._raw is not None else None, bad)

    def healthy(self) -> bool:
        """The connection can take the next statement (after the server
        refused one, or a record could not be dumped, it can)."""
        if self._raw is None:
            return False
        pgconn = self._raw.driver_connection.pgconn
        return (pgconn.status == pq.ConnStatus.OK
                and pgconn.transaction_status == pq.TransactionStatus.IDLE)

    def statement(self, records: Sequence[LoginRecord]) -> tuple[bytes, list]:
        """The prepared statement for ``records`` and its parameters, dumped
        (the connection is opened first if it is not)."""
        if len(records) == 1 and self.one_row_statement:
            name = one_statement(records[0])
            params = pg_params_one(records[0])
        else:
            name = _BATCH_UNLOCATED if all(unlocated(r) and not r.alerts_shown
                                           for r in records) else _BATCH
            params = pg_params(records)
        self._conn()
        tx = self._tx
        assert tx is not None
        names = _PREPARED[name][1]
        return name, tx.dump_sequence([params[n] for n in names], [PyFormat.TEXT] * len(names))

    def outcome(self, res: pq.abc.PGresult) -> tuple[int, list[uuid.UUID]]:
        """The events the statement inserted and the ids of the new locations
        among them: from its one row, or (a lean statement) its command tag."""
        if res.status == pq.ExecStatus.COMMAND_OK:
            return res.command_tuples or 0, []
        tx = self._tx
        assert tx is not None
        tx.set_pgresult(res)
        row = tx.load_row(0, tuple)
        return int(row[0]), list(row[3] or ())


_DONE = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)


def cancel_overdue(pgconn: pq.abc.PGconn, bound: ReplyBound) -> pq.abc.PGcancelConn | None:
    """The statement on ``pgconn`` is past ``bound``'s deadline: one line, and
    its cancel request, made on the thread that owns ``pgconn`` (None if it
    cannot be made: giving up, later, decides)."""
    log.warning("event=commit_overdue seconds=%g action=cancel", bound.deadline)
    try:
        return pgconn.cancel_conn()
    except Exception as exc:  # noqa: BLE001
        cancel_failed(exc)
        return None


def cancel_failed(exc: BaseException) -> None:
    log.debug("event=cancel_failed error=%s", show(first_line(exc)))


def send_cancel(cancel: pq.abc.PGcancelConn, timeout: float) -> None:
    """Send a cancel request (made by ``PGconn.cancel_conn()`` on the thread
    that owns the connection; this may run on any thread); raise
    OperationalError if it cannot be delivered within ``timeout`` seconds."""
    give_up = time.monotonic() + timeout
    try:
        cancel.start()
        while True:
            state = cancel.poll()
            if state == pq.PollingStatus.OK:
                return
            if state == pq.PollingStatus.FAILED:
                raise psycopg.OperationalError(
                    cancel.get_error_message().strip() or "the cancel request failed")
            poller = select.poll()
            poller.register(cancel.socket, select.POLLIN if state == pq.PollingStatus.READING
                            else select.POLLOUT)
            left = give_up - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise psycopg.OperationalError(f"the cancel request took over {timeout:g}s")
    finally:
        cancel.finish()


def _error(conn: psycopg.Connection | None, res: pq.abc.PGresult) -> psycopg.Error:
    """What a cursor would raise for a failed result: the server's error by
    its SQLSTATE; an OperationalError when the connection itself is gone."""
    if conn is None or conn.pgconn.status == pq.ConnStatus.BAD:
        message = res.error_message.decode("utf-8", "replace").strip()
        return psycopg.OperationalError(message or "the connection to the server was lost")
    return pg_errors.error_from_result(res, encoding=conn.info.encoding)


_SQLITE_COLUMNS = COLUMNS + ("new_location",)
_SQLITE_EVENT = (f"INSERT INTO login_events ({', '.join(_SQLITE_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(_SQLITE_COLUMNS))}) "
                 "ON CONFLICT (event_id, occurred_at) DO NOTHING")
# The fold of app/db/store._upsert_last_logins, written out for SQLite
# (timestamps are fixed-width ISO text there: text order is time order).
_SQLITE_LAST = (
    f"INSERT INTO last_logins ({', '.join(_LAST_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_LAST_COLUMNS))}) "
    "ON CONFLICT (username, protocol) DO UPDATE SET "
    "first_seen = CASE WHEN excluded.first_seen < last_logins.first_seen "
    "THEN excluded.first_seen ELSE last_logins.first_seen END, "
    "last_seen = CASE WHEN excluded.last_seen >= last_logins.last_seen "
    "THEN excluded.last_seen ELSE last_logins.last_seen END, "
    + "".join(f"{c} = CASE WHEN excluded.last_seen >= last_logins.last_seen "
              f"THEN excluded.{c} ELSE last_logins.{c} END, "
              for c in ("last_remote_ip", "last_local_ip", "last_host", "last_country"))
    + "login_count = last_logins.login_count + excluded.login_count")
# app/db/store._seen_before, for the SQLite writer's own connection: before
# at all, from the same place (country, or ASN)
_SQLITE_SEEN = {
    False: "SELECT 1 FROM last_logins WHERE username = ? AND first_seen < ? LIMIT 1",
    True: "SELECT 1 FROM login_places WHERE username = ? AND first_seen < ? "
          "AND kind = ? AND place = ?",
}
# app/db/store._upsert_places, written out for SQLite
_SQLITE_PLACE = ("INSERT INTO login_places (username, kind, place, first_seen) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT (username, kind, place) DO UPDATE SET first_seen = "
                 "excluded.first_seen WHERE excluded.first_seen < login_places.first_seen")
_SQLITE_DELIVERY = ("INSERT INTO login_alert_deliveries (alert_id, username, delivered_at) "
                    "VALUES (?, ?, ?) ON CONFLICT DO NOTHING")


def _converters(table: sa.Table, columns: Sequence[str], dialect: sa.Dialect):
    """Per column, the SQLAlchemy type's own value conversion (None: as is)."""
    return tuple(table.c[c].type.bind_processor(dialect) for c in columns)


def _convert(values: Sequence[object], converters) -> tuple[object, ...]:
    return tuple(v if f is None or v is None else f(v) for v, f in zip(values, converters))


class SqliteWriter(_OwnConnection):
    """SQLite: the batch as plain SQL on its own sqlite3 connection.

    One ``BEGIN IMMEDIATE`` ... ``COMMIT`` per batch (one WAL fsync with
    ``synchronous=FULL``); an event is folded into last_logins only when
    its INSERT added a row, as in app/db/store.record_logins.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._raw = None
        d = engine.dialect
        self._event_conv = _converters(login_events, _SQLITE_COLUMNS, d)
        self._when = login_events.c.occurred_at.type.bind_processor(d)
        self._last_conv = _converters(last_logins, _LAST_COLUMNS, d)
        self._delivery_conv = _converters(login_alert_deliveries,
                                          ("alert_id", "username", "delivered_at"), d)

    def _conn(self):
        if self._raw is None:
            raw = self.engine.raw_connection()
            raw.driver_connection.isolation_level = None     # we say BEGIN and COMMIT
            self._raw = raw
        return self._raw.driver_connection

    def _seen_before(self, cur, row: dict[str, object], same_place: bool) -> bool:
        args = [row["username"], self._when(row["occurred_at"])]
        if same_place:
            args += place_key(row)
        return cur.execute(_SQLITE_SEEN[same_place], args).fetchone() is not None

    def write(self, records: Sequence[LoginRecord],
              flagged: list[uuid.UUID] | None = None) -> int:
        """Store a batch; ``flagged`` gets the ids of the new locations among it."""
        records = unique_events(records)
        if not records:
            return 0
        conn = self._conn()
        try:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            rows = [rec.event_row() for rec in records]
            flag_new_locations(None, rows, lambda r, same: self._seen_before(cur, r, same))
            new, fresh, deliveries, located = 0, [], [], []
            for rec, row in zip(records, rows):
                cur.execute(_SQLITE_EVENT, _convert([row[c] for c in _SQLITE_COLUMNS],
                                                    self._event_conv))
                if cur.rowcount != 1:
                    continue            # stored already (a replay, a late commit)
                new += 1
                if row["new_location"]:
                    located.append(row["event_id"])
                if row["outcome"] == "allowed":
                    fresh.append(row)
                deliveries += [(a, row["username"], row["occurred_at"])
                               for a in rec.alerts_shown]
            if fresh:
                cur.executemany(_SQLITE_LAST, [
                    _convert([f[c] for c in _LAST_COLUMNS], self._last_conv)
                    for f in _fold(fresh)])
            if deliveries:
                deliveries.sort(key=lambda d: (d[0], d[1]))
                cur.executemany(_SQLITE_DELIVERY,
                                [_convert(d, self._delivery_conv) for d in deliveries])
            if fresh:                   # in the order every writer writes
                cur.executemany(_SQLITE_PLACE, [
                    (p["username"], p["kind"], p["place"], self._when(p["first_seen"]))
                    for p in place_rows(fresh)])
            cur.execute("COMMIT")
            if flagged is not None:
                flagged.extend(located)
        except BaseException:
            # Roll back here, in the thread that owns the connection (closing
            # it elsewhere would leave its write lock held), then start afresh.
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except Exception:  # noqa: BLE001 - the connection is dropped anyway
                pass
            self.close()
            raise
        return new



def writer_for(engine: sa.Engine, bound: ReplyBound | None = None):
    if engine.dialect.name == "postgresql":
        return PostgresWriter(engine, bound)
    if engine.dialect.name == "sqlite":
        return SqliteWriter(engine)
    return SqlAlchemyWriter(engine)
