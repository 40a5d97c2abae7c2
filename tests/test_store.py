"""The storage layer on PostgreSQL and SQLite."""

import datetime as dt
import re

import pytest
import sqlalchemy as sa

from app.db.schema import last_logins, login_events
from app.db.store import record_logins
from app.login import normalize_ip, text_form, username_text
from app.db.writers import writer_for
from tests.builders import HOSTILE_USERNAMES, T0, record


def events(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(login_events).order_by(login_events.c.occurred_at)).all()


def lasts(engine):
    with engine.connect() as conn:
        return {(r.username, r.protocol): r for r in conn.execute(sa.select(last_logins))}


# Every write path on each backend (db_url and store, indirect): PostgreSQL's
# writer twice, a batch of one login as plain values (PG_ONE) and as arrays
# like any batch (PG_BATCH).
write_paths = pytest.mark.parametrize(("db_url", "store"), [
    ("postgresql", "core"), ("postgresql", "writer"), ("postgresql", "writer-arrays"),
    ("sqlite", "core"), ("sqlite", "writer")], indirect=True)


@pytest.fixture
def store(request, engine):
    """Every write path: record_logins (imports, replays) and the daemon's batch
    writer -- on PostgreSQL the one statement, a batch of one login as plain
    values (PG_ONE) or, with "writer-arrays", as arrays like any batch
    (PG_BATCH); they must store the same rows."""
    if request.param == "core":
        def write(_engine, *records):
            with engine.begin() as conn:
                return record_logins(conn, list(records))
        yield write
        return
    writer = writer_for(engine)
    if request.param == "writer-arrays":
        writer.one_row_statement = False
    yield lambda _engine, *records: writer.write(list(records))
    writer.close()


@write_paths
def test_event_and_last_login_are_written(engine, store):
    assert store(engine, record(master_user=b"admin", auth_user=b"alice")) == 1
    (ev,) = events(engine)
    assert (ev.username, ev.protocol, ev.remote_ip, ev.local_ip) == (
        "alice@example.com", "imap", "198.51.100.7", "192.0.2.25")
    assert (ev.outcome, ev.auth_mech, ev.master_user, ev.auth_user) == (
        "allowed", "PLAIN", "admin", "alice")
    assert ev.occurred_at == T0 and ev.occurred_at.tzinfo is not None
    row = lasts(engine)[("alice@example.com", "imap")]
    assert (row.first_seen, row.last_seen, row.login_count) == (T0, T0, 1)


@write_paths
def test_second_login_updates_count_and_last_ip(engine, store):
    later = T0 + dt.timedelta(hours=1)
    store(engine, record())
    store(engine, record(at=later, remote_ip="2001:db8::7", local_ip=None))
    row = lasts(engine)[("alice@example.com", "imap")]
    assert row.login_count == 2
    assert (row.first_seen, row.last_seen) == (T0, later)
    assert (row.last_remote_ip, row.last_local_ip) == ("2001:db8::7", None)


@write_paths
def test_protocols_are_kept_apart(engine, store):
    store(engine, record(protocol="imap"), record(protocol="pop3"), record(protocol="pop3"))
    rows = lasts(engine)
    assert rows[("alice@example.com", "imap")].login_count == 1
    assert rows[("alice@example.com", "pop3")].login_count == 2


@write_paths
def test_one_batch_with_many_logins_of_one_user(engine, store):
    batch = [record(at=T0 + dt.timedelta(seconds=i), remote_ip=f"10.0.0.{i}") for i in (3, 1, 2)]
    assert store(engine, *batch) == 3
    row = lasts(engine)[("alice@example.com", "imap")]
    assert row.login_count == 3
    assert row.last_remote_ip == "10.0.0.3"
    assert row.first_seen == T0 + dt.timedelta(seconds=1)


@write_paths
def test_replay_is_idempotent(engine, store):
    a, b = record(), record(at=T0 + dt.timedelta(minutes=5))
    store(engine, a)
    assert store(engine, a, b) == 1       # a was stored already
    assert len(events(engine)) == 2
    assert lasts(engine)[("alice@example.com", "imap")].login_count == 2


@write_paths
def test_an_older_event_arriving_late_does_not_move_last_seen(engine, store):
    newer = T0 + dt.timedelta(days=1)
    store(engine, record(at=newer, remote_ip="10.1.1.1"))
    store(engine, record(at=T0, remote_ip="10.2.2.2"))
    row = lasts(engine)[("alice@example.com", "imap")]
    assert (row.first_seen, row.last_seen, row.last_remote_ip) == (T0, newer, "10.1.1.1")


@write_paths
def test_denied_logins_are_history_but_not_last_login(engine, store):
    store(engine, record(outcome="denied"))
    assert [e.outcome for e in events(engine)] == ["denied"]
    assert lasts(engine) == {}


@write_paths
@pytest.mark.parametrize("name", HOSTILE_USERNAMES, ids=range(len(HOSTILE_USERNAMES)))
def test_hostile_usernames_are_stored_verbatim(engine, store, name):
    store(engine, record(name))
    (ev,) = events(engine)
    text, raw = username_text(name)
    assert ev.username == text
    stored = ev.username_raw if ev.username_raw is not None else ev.username.encode()
    assert stored == name
    (row,) = lasts(engine).values()
    assert (row.username_raw or row.username.encode()) == name
    # the tables are intact
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(login_events)).scalar() == 1


def test_text_form():
    assert text_form(b"alice") == ("alice", None)
    assert text_form("café".encode()) == ("café", None)
    assert text_form(b"a\xffb") == ("a\\xffb", b"a\xffb")
    assert text_form(b"a\x00b") == ("a\\x00b", b"a\x00b")


@pytest.mark.parametrize("raw,expected", [
    (b"", None), (None, None), (b"192.0.2.1", "192.0.2.1"),
    (b"2001:0db8:0000::1", "2001:db8::1"), (b"fe80::1%eth0", "fe80::1"),
    (b"not-an-ip", None),
])
def test_normalize_ip(raw, expected):
    assert normalize_ip(raw) == expected


@write_paths
def test_alert_deliveries_are_written_with_the_login(engine, store):
    from app.db.schema import login_alert_deliveries
    rec = record(alerts_shown=(7, 9))
    store(engine, rec, record(b"bob@example.com"))
    store(engine, rec)                         # a replay adds nothing
    store(engine, record(b"carol@example.com", alerts_shown=(9,)))     # a batch of one
    with engine.connect() as conn:
        rows = conn.execute(sa.select(login_alert_deliveries)).all()
    assert sorted((r.alert_id, r.username) for r in rows) == [
        (7, "alice@example.com"), (9, "alice@example.com"), (9, "carol@example.com")]


@write_paths
def test_a_record_written_twice_counts_once(engine, store):
    """A slow commit that also went to the spool reaches the database twice,
    even within one batch: one event, one count."""
    rec = record()
    assert store(engine, rec, rec) == 1
    assert store(engine, rec) == 0
    assert len(events(engine)) == 1
    assert [r.login_count for r in lasts(engine).values()] == [1]


def test_usernames_past_the_index_limit_keep_their_bytes():
    name = b"x" * 5000
    text, raw = username_text(name)
    assert len(text.encode()) <= 1024 and raw == name
    assert username_text(name) == (text, raw)                  # the same key every time
    assert username_text(b"x" * 4999)[0] != text               # and a different one for another
    assert username_text(b"short") == ("short", None)


@write_paths
def test_refusal_message_and_unapplied_policy_are_kept(engine, store):
    store(engine, record(outcome="denied", rule_id=7, message="Call the helpdesk."),
          record(b"bob", policy_applied=False))
    got = {e.username: e for e in events(engine)}
    assert got["alice@example.com"].message == "Call the helpdesk."
    assert got["alice@example.com"].policy_applied is True
    assert got["bob"].policy_applied is False and got["bob"].message is None


def test_rule_ids_are_never_reused(engine):
    from app.db.rules import add_rule, remove_rule
    with engine.begin() as conn:
        first = add_rule(conn, action="deny", username="a@example.com")
        second = add_rule(conn, action="deny", username="b@example.com")
        remove_rule(conn, second)
        third = add_rule(conn, action="deny", username="c@example.com")
    assert third > second > first


def test_upgrade_starts_sqlite_ids_past_what_history_mentions(tmp_path):
    """A database from before AUTOINCREMENT: rule 3 removed, refusals still name it."""
    from app.db.migrate import upgrade
    from app.db import make_engine
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "b0b2b42900cb")
    eng = make_engine(url)
    with eng.begin() as conn:
        conn.exec_driver_sql("INSERT INTO access_rules (id, action) VALUES (1, 'deny')")
        conn.exec_driver_sql(
            "INSERT INTO login_events (event_id, occurred_at, username, protocol, outcome, "
            "rule_id) VALUES ('00000000000040008000000000000001', '2026-11-01 00:00:00', "
            "'x', 'imap', 'denied', 3)")
    upgrade(url)
    with eng.begin() as conn:
        rows = conn.exec_driver_sql("SELECT name FROM sqlite_sequence ORDER BY name").all()
        names = [r.name for r in rows]
        assert len(names) == len(set(names)) and {"access_rules", "login_alerts"} <= set(names)
        conn.exec_driver_sql("INSERT INTO access_rules (action) VALUES ('deny')")
        ids = conn.exec_driver_sql("SELECT id FROM access_rules ORDER BY id").scalars().all()
        version = conn.exec_driver_sql("SELECT version FROM config_version").scalar()
        conn.exec_driver_sql("DELETE FROM access_rules WHERE id = 1")
        assert conn.exec_driver_sql("SELECT version FROM config_version").scalar() > version
    eng.dispose()
    assert ids == [1, 4]


@pytest.mark.parametrize("path", ["core", "writer", "writer-one-by-one"])
def test_new_locations_and_last_country_on_every_write_path(engine, path):
    """The flag and the last country come out the same from record_logins and
    from the daemon's batch writer of each backend (PostgreSQL's one statement,
    SQLite's own connection), whether the logins come in batches or one per
    commit (PostgreSQL's PG_ONE)."""
    writer = writer_for(engine)

    def write(*records):
        flagged = []
        if path == "core":
            with engine.begin() as conn:
                record_logins(conn, list(records), flagged)
        elif path == "writer":
            writer.write(list(records), flagged)
        else:
            for rec in records:
                writer.write([rec], flagged)
        return flagged

    h = dt.timedelta(hours=1)
    first = record(country="DE", asn=3320)
    assert write(first) == []                                   # the first login is not new
    known = record(at=T0 + h, country="DE", asn=3320)
    unlocated = record(at=T0 + 2 * h)
    assert write(known, unlocated) == []
    new_country = record(at=T0 + 3 * h, country="FR", asn=3215, protocol="pop3")
    denied = record(at=T0 + 4 * h, country="BR", asn=1, outcome="denied")
    same_batch = record(at=T0 + 5 * h, country="FR", asn=3215)  # FR seen earlier in this batch
    asn_only = record(at=T0 + 6 * h, asn=64500)                 # no country: the ASN decides
    assert sorted(write(new_country, denied, same_batch, asn_only)) == sorted(
        [new_country.event_id, asn_only.event_id])
    flags = {ev.event_id: ev.new_location for ev in events(engine)}
    assert [k for k, v in flags.items() if v] == [new_country.event_id, asn_only.event_id]
    assert {k: r.last_country for k, r in lasts(engine).items()} == {
        ("alice@example.com", "imap"): None, ("alice@example.com", "pop3"): "FR"}
    writer.close()


def test_the_statements_go_without_comments_each_converted_once():
    """What the server parses is the statement without its comments and
    runs of blanks, converted to libpq's $n placeholders once, at import
    (the writers prepare it by name; nothing parses it again per commit)."""
    from app.db import writers
    statements = (writers.PG_BATCH, writers.PG_BATCH_UNLOCATED, writers.PG_ONE,
                  writers.PG_ONE_UNLOCATED,
                  writers.PG_LEAN_ALLOWED, writers.PG_LEAN_OTHER, writers.PG_LEAN_COUNTRY,
                  writers.PG_LEAN_ASN)
    for statement in statements:
        assert "--" not in statement and "  " not in statement
    assert sorted(text for text, _ in writers._PREPARED.values()) == sorted(
        writers._positional(s)[0] for s in statements)


def test_the_postgresql_batch_is_planned_once_not_for_every_commit(pg_db):
    """Left to choose, PostgreSQL planned the batch statement afresh for each
    commit (~1.3 ms of its CPU, more than running it); the writer's
    connection asks for the one generic plan."""
    from app.db import make_engine
    from app.db.writers import PostgresWriter
    engine = make_engine(pg_db)
    writer = PostgresWriter(engine)
    try:
        for i in range(8):          # past the 5 custom plans PostgreSQL tries first
            at = T0 + dt.timedelta(seconds=i)
            assert writer.write([record(b"u%d@example.com" % (i % 3), at=at)]) == 1
            assert writer.write([record(b"d%d@example.com" % (i % 3), at=at,
                                        outcome="denied")]) == 1
            assert writer.write([record(b"a%d@example.com" % (i % 3), at=at,
                                        alerts_shown=(1,))]) == 1
            assert writer.write([record(b"p%d@example.com" % (i % 3), at=at,
                                        country="FR")]) == 1
            assert writer.write([record(b"n%d@example.com" % (i % 3), at=at, asn=64500)]) == 1
            assert writer.write([record(b"o%d@example.com" % (i % 3), at=at, country="FR",
                                        alerts_shown=(1,))]) == 1
            assert writer.write([record(b"v%d@example.com" % (i % 3), at=at),
                                 record(b"w%d@example.com" % (i % 3), at=at)]) == 2
            assert writer.write([record(b"x%d@example.com" % (i % 3), at=at, country="FR"),
                                 record(b"y%d@example.com" % (i % 3), at=at)]) == 2
        plans = writer._conn().execute(
            "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements "
            "WHERE statement LIKE %s ORDER BY name", ["%INSERT INTO login_events%"]).fetchall()
    finally:
        writer.close()
        engine.dispose()
    assert plans == [("lastlogin_batch", 8, 0), ("lastlogin_batch_unlocated", 8, 0),
                     ("lastlogin_lean_allowed", 8, 0),
                     ("lastlogin_lean_asn", 8, 0), ("lastlogin_lean_country", 8, 0),
                     ("lastlogin_lean_other", 8, 0), ("lastlogin_one", 8, 0),
                     ("lastlogin_one_unlocated", 8, 0)]


def test_pg_one_and_pg_batch_store_every_column_alike(pg_db):
    """The same logins, one per commit, through PG_ONE and through PG_BATCH
    (PG_BATCH_UNLOCATED where it may): every column of every table the same. PG_ONE's row takes the columns by
    position, so a column order that drifted from PG_BATCH's would swap
    values here (the other tests leave most columns at their defaults)."""
    from app.db import make_engine
    from app.db.schema import login_alert_deliveries
    from app.db.writers import PostgresWriter
    from tests.harness.db import empty_tables

    first = record(b"a\xff@example.com", at=T0 - dt.timedelta(days=1), country="DE")
    unplaced = record(b"c@example.com", remote_ip="2001:db8::7", host="mx3",
                      master_user=b"m'; --\\", session_id="sess-3")
    logins = [
        first,
        record(b"a\xff@example.com", rule_id=2**31 - 1, master_user=b"admin",
               auth_user=b"a", alerts_shown=(3, 4), message="m\u00e9ssage", host="mx1",
               country="FR", asn=4_200_000_000, session_id="sess-1",
               policy_applied=False),
        record(b"b@example.com", outcome="denied", local_ip=None, rule_id=7,
               message="go away", host="mx2", asn=1, session_id="sess-2"),
        unplaced,                                               # the lean ones from here
        record(b"c@example.com", at=T0 - dt.timedelta(days=2), remote_ip="192.0.2.9"),
        record(b"c@example.com", at=T0 + dt.timedelta(hours=1), protocol="pop3",
               policy_applied=False),
        record(b"d\t\\\xfe" + b"x" * 4000, outcome="denied", rule_id=3, message="no"),
        record(b"e@example.com", alerts_shown=(5,)),            # unlocated, with an alert
        record(b"a\xff@example.com", at=T0 + dt.timedelta(hours=2), country="JP", asn=2497),
        record(b"a\xff@example.com", at=T0 + dt.timedelta(hours=3), asn=64500, protocol="pop3"),
        record(b"a\xff@example.com", at=T0 + dt.timedelta(hours=4), country="JP"),   # seen
        record(b"f@example.com", country="NZ"),                 # a first login is not new
        record(b"k@example.com", at=T0 - dt.timedelta(hours=3), country="DE", asn=3320),
        record(b"k@example.com", at=T0 - dt.timedelta(hours=2), asn=3320),     # ASN seen
        record(b"k@example.com", at=T0 - dt.timedelta(hours=1), country="DE", asn=1),  # a new
        record(b"k@example.com", country="AT", asn=3320),       # ASN, a seen one: the country rules
        record(b"g\xe9@example.com", host="mx4"),              # not UTF-8: username_raw set
        record(b"h@example.com", outcome="failed", message="bad password", asn=7),
    ]
    engine = make_engine(pg_db)
    stored, used = {}, {}
    try:
        for one in (True, False):
            empty_tables(engine)
            writer = PostgresWriter(engine)
            writer.one_row_statement = one
            flagged: list = []
            try:
                for rec in logins:
                    assert writer.write([rec], flagged) == 1
                assert writer.write([unplaced], flagged) == 0       # a replay counts nothing
                assert writer.write([logins[6]], flagged) == 0
                used[one] = dict(writer._conn().execute(
                    "SELECT name, generic_plans FROM pg_prepared_statements").fetchall())
            finally:
                writer.close()
            with engine.connect() as conn:
                stored[one] = tuple(
                    sorted(conn.execute(sa.select(table)).all(), key=repr)
                    for table in (login_events, last_logins, login_alert_deliveries)
                ) + (flagged,)
    finally:
        engine.dispose()
    assert stored[True] == stored[False]
    assert used[True] == {"lastlogin_one": 1, "lastlogin_one_unlocated": 1, "lastlogin_batch": 0,
                          "lastlogin_batch_unlocated": 0,
                          "lastlogin_lean_allowed": 5, "lastlogin_lean_other": 4,
                          "lastlogin_lean_country": 7, "lastlogin_lean_asn": 2}
    # as arrays: a login with a place or an alert through PG_BATCH, the rest without its CTEs
    assert {k: v for k, v in used[False].items() if v} == {
        "lastlogin_batch": 11, "lastlogin_batch_unlocated": 9}
    events_, lasts_, deliveries, flagged = stored[True]
    assert {(e.host, e.message, e.session_id) for e in events_} >= {
        ("mx1", "m\u00e9ssage", "sess-1"), ("mx2", "go away", "sess-2")}
    assert len(deliveries) == 3
    assert flagged == [logins[1].event_id, logins[8].event_id, logins[9].event_id,
                       logins[15].event_id]
    assert {row.username_raw for row in lasts_} >= {b"g\xe9@example.com"}
    assert "h@example.com" not in {row.username for row in lasts_}    # a failure folds nothing
    c_imap = [row for row in lasts_ if row.username == "c@example.com" and row.protocol == "imap"]
    assert [(r.login_count, r.first_seen, r.last_seen, r.last_remote_ip) for r in c_imap] == [
        (2, T0 - dt.timedelta(days=2), unplaced.occurred_at, "2001:db8::7")]


def test_the_writer_prepares_one_statement_whatever_its_integers_and_nulls(pg_db):
    """Every parameter's type comes from its cast in the statement: one
    prepared statement for rule ids and AS numbers of any size, set or NULL
    (a cursor prepared one per combination of int2/int4/int8 and NULLs)."""
    from app.db import make_engine
    from app.db.writers import PostgresWriter
    engine = make_engine(pg_db)
    writer = PostgresWriter(engine)
    try:
        def prepared():
            return writer._conn().execute(
                "SELECT name FROM pg_prepared_statements "
                "WHERE statement LIKE %s ORDER BY name", ["%INSERT INTO login_events%"]).fetchall()

        for i, (rule_id, asn) in enumerate([(5, 5), (70_000, 70_000), (5, 5_000_000_000),
                                            (2**31 - 1, 64_500), (None, None)]):
            assert writer.write([record(b"u%d@example.com" % i, rule_id=rule_id, asn=asn,
                                        country="FR" if asn else None)]) == 1
            assert writer.write([record(b"v%d@example.com" % i, rule_id=rule_id, asn=asn),
                                 record(b"w%d@example.com" % i)]) == 2
        names = prepared()
    finally:
        writer.close()
        engine.dispose()
    assert names == [("lastlogin_batch",), ("lastlogin_batch_unlocated",),
                     ("lastlogin_lean_allowed",), ("lastlogin_lean_asn",),
                     ("lastlogin_lean_country",), ("lastlogin_lean_other",), ("lastlogin_one",),
                     ("lastlogin_one_unlocated",)]


@pytest.mark.parametrize("damage", [
    lambda s: s.replace("AS t(event_id, occurred_at", "AS t(occurred_at, event_id"),
    lambda s: s.replace("%(message)s::text[], %(policy_applied)s::bool[], %(host)s::text[]",
                        "%(host)s::text[], %(policy_applied)s::bool[], %(message)s::text[]"),
    lambda s: s.replace("WITH input AS ( SELECT * FROM unnest(", "WITH input AS ( SELECT * FROM f("),
    lambda s: s + " " + s[s.index("WITH input AS"):s.index(", located AS")],
], ids=["columns-swapped", "arrays-swapped", "no-unnest", "two-inputs"])
def test_a_batch_statement_pg_one_cannot_follow_is_refused(damage):
    from app.db.writers import COLUMNS, PG_BATCH, _one_row_statement
    damaged = damage(PG_BATCH)
    assert damaged != PG_BATCH
    with pytest.raises(RuntimeError):
        _one_row_statement(damaged)
    assert _one_row_statement(PG_BATCH).count(" AS ") >= len(COLUMNS)


@pytest.mark.parametrize("damage", [
    lambda s: s.replace("WHEN i.outcome <> 'allowed' OR", "WHEN i.outcome = 'denied' OR"),
    lambda s: s.replace("(i.country IS NULL AND i.asn IS NULL)", "(i.country IS NULL)"),
    lambda s: s.replace("END AS new_location", "END AS located_new"),
], ids=["outcome-test", "place-test", "no-new-location"])
def test_a_one_row_statement_the_unlocated_one_cannot_follow_is_refused(damage):
    """The unlocated statement stands for the CASE's first branch, which the
    writer tests in Python: a CASE that says anything else stops the daemon."""
    from app.db.writers import PG_ONE, _unlocated_statement
    damaged = damage(PG_ONE)
    assert damaged != PG_ONE
    with pytest.raises(RuntimeError):
        _unlocated_statement(damaged)
    assert "false AS new_location" in _unlocated_statement(PG_ONE)


def test_every_fold_reads_the_row_as_stored_even_one_a_trigger_rewrote(pg_db):
    """An operator's BEFORE INSERT trigger on login_events rewrites the row
    (lowercases the name, drops the address): the fold into last_logins
    follows the stored row on every path -- the batch, and each one-login
    statement -- so a user's last_logins row does not depend on the load."""
    from app.db import make_engine
    from app.db.writers import PostgresWriter
    from tests.harness.db import empty_tables

    engine = make_engine(pg_db)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION ll_test_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN NEW.username := lower(NEW.username); NEW.remote_ip := NULL; RETURN NEW; END $$")
        conn.exec_driver_sql("CREATE TRIGGER ll_test_rewrite BEFORE INSERT ON login_events "
                             "FOR EACH ROW EXECUTE FUNCTION ll_test_rewrite()")
    logins = [record(b"Alice@Example.com", at=T0 - dt.timedelta(hours=2)),
              record(b"Alice@Example.com", at=T0 - dt.timedelta(hours=1), country="DE"),
              record(b"Alice@Example.com", asn=64500, protocol="pop3")]
    stored = {}
    try:
        for one in (True, False):
            empty_tables(engine)
            writer = PostgresWriter(engine)
            writer.one_row_statement = one
            try:
                for rec in logins:
                    writer.write([rec])
            finally:
                writer.close()
            with engine.connect() as conn:
                stored[one] = sorted(conn.execute(
                    sa.select(last_logins.c.username, last_logins.c.protocol,
                              last_logins.c.last_remote_ip, last_logins.c.login_count)).all())
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER ll_test_rewrite ON login_events")
            conn.exec_driver_sql("DROP FUNCTION ll_test_rewrite()")
        engine.dispose()
    assert stored[True] == stored[False] == [("alice@example.com", "imap", None, 2),
                                             ("alice@example.com", "pop3", None, 1)]


@pytest.mark.parametrize("damage", [
    lambda s: s.replace("last_country, login_count)", "last_country, login_count, last_asn)"),
    lambda s: s.replace("policy_applied, host, country, asn, session_id, new_location)",
                        "policy_applied, host, asn, country, session_id, new_location)"),
    lambda s: s.replace("ON CONFLICT (event_id, occurred_at) DO NOTHING", "ON CONFLICT DO NOTHING"),
    lambda s: s.replace("%(asn)s::bigint[]", "%(asn)s::bigint"),
    lambda s: s.replace("FROM new WHERE outcome = 'allowed' GROUP BY",
                        "FROM new WHERE outcome IN ('allowed', 'failed') GROUP BY"),
    lambda s: s.replace("login_count = l.login_count + EXCLUDED.login_count RETURNING 1",
                        "login_count = l.login_count + EXCLUDED.login_count "
                        "WHERE l.last_seen < EXCLUDED.last_seen RETURNING 1"),
    lambda s: s.replace("(array_agg(host ORDER BY occurred_at DESC))[1]",
                        "(array_agg(host ORDER BY occurred_at))[1]"),
    lambda s: s.replace("WHEN i.country IS NOT NULL THEN", "WHEN i.asn IS NULL THEN"),
    lambda s: s.replace("b.outcome = 'allowed' AND b.occurred_at < i.occurred_at)) THEN false",
                        "b.outcome = 'allowed' AND b.occurred_at <= i.occurred_at)) THEN false"),
    lambda s: s.replace("p.place = i.country", "p.place = i.host"),
    lambda s: s.replace("p.username = i.username AND p.first_seen < i.occurred_at) OR",
                        "p.username = i.username AND p.last_seen < i.occurred_at) OR"),
    lambda s: s.replace("p.kind = 'asn'", "p.kind = 'country'"),
    lambda s: s.replace(", placed AS (", ", places AS ("),
], ids=["fold-column-added", "event-columns-swapped", "conflict-target", "not-an-array",
        "fold-filter", "fold-update-where", "fold-order", "asn-first", "batch-probe-order",
        "probe-column", "first-probe-table", "probe-kind", "places-cte"])
def test_a_batch_statement_the_lean_ones_cannot_follow_is_refused(damage):
    """The lean statements take PG_BATCH's columns, casts, conflict target
    and fold; a PG_BATCH they cannot follow stops the daemon at import."""
    from app.db.writers import PG_BATCH, _lean_statements
    damaged = damage(PG_BATCH)
    assert damaged != PG_BATCH
    with pytest.raises(RuntimeError):
        _lean_statements(damaged)


def test_the_lean_located_statements_write_the_places_as_the_batch_does():
    """Their login_places CTE is PG_BATCH's own text, whatever it says."""
    from app.db.writers import PG_BATCH, _lean_statements
    changed = PG_BATCH.replace("> n.occurred_at, true)", ">= n.occurred_at, true)")
    for batch in (PG_BATCH, changed):
        placed = re.search(r", placed AS \( (INSERT .*? WHERE EXCLUDED\.first_seen < "
                           r"s\.first_seen) \) SELECT", batch).group(1)
        allowed, other, country, asn = _lean_statements(batch)
        assert placed in country and placed in asn
        assert "login_places" not in allowed and "login_places" not in other


def test_a_batch_without_places_or_alerts_goes_without_their_ctes(pg_db):
    """The commonest batch (every login unlocated, no alert shown) is PG_BATCH
    without the new-location probes, the deliveries and the places, which
    write nothing for it; any login with a place or an alert takes PG_BATCH.
    (Every write-path test above stores such batches through it.)"""
    from app.db import make_engine, writers
    from app.db.writers import PostgresWriter
    lean = writers.PG_BATCH_UNLOCATED
    assert "false AS new_location" in lean and "EXISTS" not in lean
    assert "login_places" not in lean and "login_alert_deliveries" not in lean
    assert lean.startswith(writers.PG_BATCH[:writers.PG_BATCH.index(" located AS (")])
    with pytest.raises(RuntimeError, match="deliveries and places"):
        writers._unlocated_batch_statement(writers.PG_BATCH.replace(
            "FROM delivered)", "FROM delivered_rows)"))
    with pytest.raises(RuntimeError, match="deliveries and places"):     # a CTE after them
        writers._unlocated_batch_statement(writers.PG_BATCH.replace(
            ") SELECT (SELECT count(*) FROM new)",
            "), later AS (SELECT 1) SELECT (SELECT count(*) FROM new)"))
    for change in (("WHERE n.outcome = 'allowed' AND v.place", "WHERE v.place"),
                   ("JOIN new n ON n.event_id = d.event_id", "CROSS JOIN new n"),
                   ("(SELECT array_agg(event_id) FROM new WHERE new_location)",
                    "(SELECT count(*) FROM placed)")):
        with pytest.raises(RuntimeError, match="may write for an unlocated login"):
            writers._unlocated_batch_statement(writers.PG_BATCH.replace(*change))
    engine = make_engine(pg_db)
    writer = PostgresWriter(engine)
    try:
        plain = [record(b"a@example.com"),
                 record(b"b@example.com", outcome="denied", country="FR", asn=3215)]
        assert writer.statement(plain)[0] == writers._BATCH_UNLOCATED
        for other in (record(b"c@example.com", country="FR"), record(b"c@example.com", asn=1),
                      record(b"c@example.com", alerts_shown=(1,))):
            assert writer.statement([*plain, other])[0] == writers._BATCH
        assert writer.write(plain) == 2
        assert {(ev.username, ev.outcome, ev.new_location) for ev in events(engine)} == {
            ("a@example.com", "allowed", False), ("b@example.com", "denied", False)}
        assert set(lasts(engine)) == {("a@example.com", "imap")}
    finally:
        writer.close()
        engine.dispose()


def test_pg_batch_unlocated_stores_and_answers_what_pg_batch_does(pg_db, monkeypatch):
    """The same batches -- every login unlocated and without alerts, refused
    ones with a place among them, a login twice in its batch, replays of
    earlier batches, located and alerted batches in between -- once with
    PG_BATCH for everything, once as the writer picks: every reply and
    every row of every table the same."""
    import random

    from app.db import make_engine, writers
    from app.db.schema import login_alert_deliveries, login_places
    from app.db.writers import PostgresWriter
    from tests.harness.db import empty_tables

    rnd = random.Random(9)
    users = [b"u%d@example.com" % i for i in range(4)] + [b"U0@example.com", b"v\xff@x"]
    batches: list[list] = []
    for n in range(60):
        at = T0 + dt.timedelta(minutes=n)
        if n % 7 == 6:      # a replay of an earlier batch (the same records)
            batches.append(batches[rnd.randrange(len(batches))])
            continue
        batch = []
        for k in range(rnd.randint(1, 6)):
            outcome = rnd.choice(["allowed", "allowed", "denied", "failed"])
            place = {} if outcome == "allowed" else rnd.choice(
                [{}, {"country": "FR"}, {"asn": 64500}, {"country": "DE", "asn": 3320}])
            batch.append(record(rnd.choice(users), at=at + dt.timedelta(seconds=k),
                                protocol=rnd.choice(["imap", "pop3"]), outcome=outcome, **place))
        if n % 5 == 1:
            batch.append(batch[0])                          # twice in one batch
        if n % 9 == 4:
            batch.append(record(rnd.choice(users), at=at, country="JP"))      # located
        if n % 11 == 5:
            batch.append(record(rnd.choice(users), at=at, alerts_shown=(2,)))  # an alert
        batches.append(batch)
    engine = make_engine(pg_db)
    replies, stored, used = {}, {}, {}
    try:
        for lean in (False, True):
            empty_tables(engine)
            with monkeypatch.context() as mp:
                if not lean:
                    mp.setattr(writers, "_BATCH_UNLOCATED", writers._BATCH)
                writer = PostgresWriter(engine)
                writer.one_row_statement = False
                try:
                    flagged: list = []
                    replies[lean] = [(writer.write(b, flagged), list(flagged)) for b in batches]
                    used[lean] = dict(writer._conn().execute(
                        "SELECT name, generic_plans FROM pg_prepared_statements").fetchall())
                finally:
                    writer.close()
            with engine.connect() as conn:
                stored[lean] = [sorted(conn.execute(sa.select(t)).all(), key=repr)
                                for t in (login_events, last_logins, login_places,
                                          login_alert_deliveries)]
    finally:
        engine.dispose()
    assert used[False]["lastlogin_batch_unlocated"] == 0
    assert used[True]["lastlogin_batch_unlocated"] >= 40 and used[True]["lastlogin_batch"] >= 8
    assert replies[True] == replies[False]
    assert stored[True] == stored[False]
    assert all(stored[True]) and sum(n for n, _ in replies[True]) < sum(map(len, batches))


def test_the_writer_picks_the_unlocated_statement_as_the_case_would():
    from app.db.writers import unlocated
    assert unlocated(record(b"a@example.com"))
    assert unlocated(record(b"a@example.com", outcome="denied", country="FR", asn=1))
    assert not unlocated(record(b"a@example.com", country="FR"))
    assert not unlocated(record(b"a@example.com", asn=64500))


def test_an_address_column_refuses_what_is_not_an_address_with_the_same_error():
    """Parsed addresses are cached; what cannot be cached (or parsed) still
    gets ipaddress's own ValueError."""
    from app.db.types import IPAddress
    assert IPAddress.canonical("2001:DB8::0:7") == IPAddress.canonical("2001:db8::7") == "2001:db8::7"
    for bad in ("not-an-address", ["192.0.2.1"], "192.0.2.256"):
        with pytest.raises(ValueError):
            IPAddress.canonical(bad)


def test_the_writer_raises_what_a_cursor_would_and_reconnects(pg_db):
    """The writer runs its statement through libpq itself: a row the server
    refuses raises psycopg's error for that SQLSTATE (not an outage); a
    connection the server ended raises OperationalError (an outage: the
    recorder spools); the next write opens a new connection and commits."""
    import psycopg

    from app.db import make_engine
    from app.db.writers import PostgresWriter
    from app.recorder import database_away
    engine = make_engine(pg_db)
    writer = PostgresWriter(engine)
    try:
        assert writer.write([record(b"first@example.com")]) == 1
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.username = 'refused@example.com' THEN "
                "RAISE EXCEPTION 'no' USING ERRCODE = 'check_violation'; END IF; "
                "RETURN NEW; END $$")
            conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON login_events "
                                 "FOR EACH ROW EXECUTE FUNCTION refuse()")
        try:
            for batch in ([record(b"refused@example.com")],
                          [record(b"refused@example.com"), record(b"mate@example.com")]):
                with pytest.raises(psycopg.errors.CheckViolation) as refused:
                    writer.write(batch)
                assert refused.value.sqlstate == "23514" and not database_away(refused.value)
        finally:
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP TRIGGER refuse ON login_events")
                conn.exec_driver_sql("DROP FUNCTION refuse()")
        backend = writer._conn().info.backend_pid
        with engine.begin() as conn:
            assert conn.exec_driver_sql(
                f"SELECT pg_terminate_backend({int(backend)})").scalar()
        with pytest.raises(psycopg.OperationalError) as lost:
            writer.write([record(b"lost@example.com")])
        assert database_away(lost.value)
        assert writer.write([record(b"again@example.com")]) == 1
        assert writer._conn().info.backend_pid != backend
    finally:
        writer.close()
        engine.dispose()
    with engine.connect() as conn:
        names = sorted(conn.execute(sa.select(login_events.c.username)).scalars())
    assert names == ["again@example.com", "first@example.com"]
