"""login_places: the new-location test asks it (and last_logins) instead of
the history, and gets the history's answer on every write path.

The reference is the definition read off the history itself, in Python:
an allowed login with a place, of a user with an earlier allowed login
(stored before its batch, or in it), none of them from that place (the
country, or without one the ASN). Retention aside: it prunes the history
and leaves login_places, so a place stays known.
"""

import datetime as dt
import random
import time

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.migrate import upgrade
from app.db.retention import prune
from app.db.schema import last_logins, login_events, login_places
from app.db.store import record_logins, unique_events
from app.db.writers import writer_for
from tests.builders import T0, record

PATHS = pytest.mark.parametrize(("db_url", "path"), [
    ("postgresql", "core"), ("postgresql", "writer"), ("postgresql", "writer-arrays"),
    ("sqlite", "core"), ("sqlite", "writer")], indirect=["db_url"])


def writing(engine, path):
    """write(records) -> the ids flagged new, through one write path."""
    if path == "core":
        def write(records):
            flagged = []
            with engine.begin() as conn:
                record_logins(conn, records, flagged)
            return flagged
        return write, lambda: None
    writer = writer_for(engine)
    if path == "writer-arrays":
        writer.one_row_statement = False

    def write(records):
        flagged = []
        writer.write(records, flagged)
        return flagged
    return write, writer.close


def expected_flags(batches):
    """The new-location flag of every login stored, by the history's definition."""
    stored = []         # (user, at, country, asn) of the allowed logins stored
    ids, flags = set(), {}
    for batch in batches:
        batch = unique_events(batch)
        for rec in batch:
            if rec.event_id in ids:
                continue            # a replay: not stored again
            user, at = rec.username, rec.occurred_at
            allowed_before = [(c, a) for u, t, c, a in stored if u == user and t < at] + [
                (b.country, b.asn) for b in batch
                if b.username == user and b.outcome == "allowed" and b.occurred_at < at]
            if rec.outcome != "allowed" or (rec.country is None and rec.asn is None):
                flags[rec.event_id] = False
            elif rec.country is not None:
                flags[rec.event_id] = bool(allowed_before) and all(
                    c != rec.country for c, _ in allowed_before)
            else:
                flags[rec.event_id] = bool(allowed_before) and all(
                    a != rec.asn for _, a in allowed_before)
        for rec in batch:
            if rec.event_id not in ids:
                ids.add(rec.event_id)
                if rec.outcome == "allowed":
                    stored.append((rec.username, rec.occurred_at, rec.country, rec.asn))
    return flags


def places_from_history(conn):
    """login_places as the stored history says it should be."""
    e = login_events
    out = set()
    for kind, col in (("country", e.c.country), ("asn", e.c.asn)):
        for user, place, first in conn.execute(
                sa.select(e.c.username, col, sa.func.min(e.c.occurred_at))
                .where(e.c.outcome == "allowed", col.is_not(None)).group_by(e.c.username, col)):
            out.add((user, kind, str(place), first))
    return out


def places(conn):
    p = login_places
    return set(conn.execute(sa.select(p.c.username, p.c.kind, p.c.place, p.c.first_seen)))


def shuffled_logins(seed: int, n_batches: int = 70):
    """Batches of logins in no particular time order: four users, places
    that repeat, logins with only an ASN or none, refused and failed ones,
    two logins at the same instant, replays of logins already stored."""
    rnd = random.Random(seed)
    users = [b"ann@example.com", b"bob@example.com", b"cyd@example.org", b"dee@example.org"]
    places_ = [("DE", 3320), ("DE", 8881), ("FR", 3215), (None, 64500), (None, 3320),
               ("AT", None), (None, None)]
    done, batches = [], []
    for _ in range(n_batches):
        batch = []
        for _ in range(rnd.choice((1, 1, 1, 2, 3, 5))):
            if done and rnd.random() < 0.08:
                batch.append(rnd.choice(done))          # a replay
                continue
            country, asn = rnd.choice(places_)
            at = T0 + dt.timedelta(hours=rnd.randrange(-400, 400))
            if done and rnd.random() < 0.1:
                at = rnd.choice(done).occurred_at       # the same instant as another
            rec = record(rnd.choice(users), at=at, country=country, asn=asn,
                         protocol=rnd.choice(("imap", "pop3")),
                         outcome=rnd.choices(("allowed", "denied", "failed"), (8, 1, 1))[0])
            batch.append(rec)
        done += batch
        batches.append(batch)
    return batches


@PATHS
@pytest.mark.parametrize("seed", [1, 2, 8, 13])   # 8, 13: an ASN seen in the batch with a country
def test_every_path_flags_what_the_history_says(engine, path, seed):
    batches = shuffled_logins(seed)
    want = expected_flags(batches)
    assert 5 < sum(want.values()) < len(want) // 2          # the case is not trivial
    write, close = writing(engine, path)
    try:
        flagged = [i for batch in batches for i in write(batch)]
    finally:
        close()
    assert sorted(flagged) == sorted(k for k, v in want.items() if v)
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.select(login_events.c.event_id,
                                             login_events.c.new_location)).all())
        assert stored == want
        assert places(conn) == places_from_history(conn)


@PATHS
def test_a_user_known_only_from_last_logins_is_known(engine, path):
    """A user whose history is gone (retention), or who came in from the
    last_login plugin's table (import), still logged in before: a login from
    a place not in login_places is new. The history alone could not tell."""
    with engine.begin() as conn:
        conn.execute(last_logins.insert().values(
            username="alice@example.com", protocol="imap", first_seen=T0 - dt.timedelta(days=400),
            last_seen=T0 - dt.timedelta(days=400), login_count=7))
    write, close = writing(engine, path)
    try:
        located = record(at=T0, country="DE", asn=3320)
        assert write([located]) == [located.event_id]
        assert write([record(at=T0 + dt.timedelta(hours=1), country="DE", asn=3320)]) == []
        # someone the daemon never saw: the first login is not new
        assert write([record(b"bob@example.com", at=T0, country="FR")]) == []
    finally:
        close()


@PATHS
def test_retention_leaves_the_places(engine, path):
    """login_places is a summary, like last_logins: a place stays known after
    the logins that showed it were pruned, with the time it was first seen."""
    day = dt.timedelta(days=1)
    history = [record(at=T0 - 90 * day, country="DE", asn=3320),
               record(at=T0 - 60 * day, country="FR", asn=3215),
               record(at=T0 - 50 * day, asn=64500),
               record(at=T0 - 10 * day, country="DE", asn=8881)]
    write, close = writing(engine, path)
    try:
        for rec in history:
            write([rec])
        with engine.connect() as conn:
            before = places(conn)
            assert before == places_from_history(conn)
        prune(engine, T0 - 30 * day)
        with engine.connect() as conn:
            assert places(conn) == before
            assert conn.execute(sa.select(sa.func.count()).select_from(login_events)
                                ).scalar_one() == 1
        back = [record(at=T0, country="FR"), record(at=T0 + day, asn=64500),
                record(at=T0 + 2 * day, country="AT")]
        assert [write([rec]) for rec in back] == [[], [], [back[2].event_id]]
    finally:
        close()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_upgrade_fills_the_places_from_the_history(request, backend, tmp_path):
    if backend == "postgresql":
        url = request.getfixturevalue("pg_cluster").create_database()
    else:
        url = f"sqlite:///{tmp_path / 'up.db'}"
    upgrade(url, "4d7e0f2b8c19")                # the release before login_places
    engine = make_engine(url)
    h = dt.timedelta(hours=1)
    history = [record(at=T0 + 3 * h, country="DE", asn=3320),
               record(at=T0 + 1 * h, country="DE", asn=8881),
               record(at=T0 + 2 * h, asn=64500),
               record(b"bob@example.com", at=T0, country="FR", asn=3215, outcome="denied"),
               record(b"bob@example.com", at=T0 + h)]
    cols = ("event_id", "occurred_at", "username", "protocol", "outcome", "country", "asn")
    with engine.begin() as conn:                # the columns that release had, as it wrote them
        conn.execute(login_events.insert(), [
            {c: v for c, v in rec.event_row().items() if c in cols} for rec in history])
        conn.execute(last_logins.insert(), [
            {"username": "alice@example.com", "protocol": "imap", "first_seen": T0 + h,
             "last_seen": T0 + 3 * h, "login_count": 3},
            {"username": "bob@example.com", "protocol": "imap", "first_seen": T0 + h,
             "last_seen": T0 + h, "login_count": 1}])
    engine.dispose()
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert places(conn) == places_from_history(conn) == {
                ("alice@example.com", "country", "DE", T0 + h),
                ("alice@example.com", "asn", "8881", T0 + h),
                ("alice@example.com", "asn", "3320", T0 + 3 * h),
                ("alice@example.com", "asn", "64500", T0 + 2 * h)}
        write, close = writing(engine, "writer")
        try:
            fr, de = record(at=T0 + 4 * h, country="FR"), record(at=T0 + 5 * h, country="DE")
            bob = record(b"bob@example.com", at=T0 + 4 * h, country="FR", asn=3215)
            assert write([fr, de, bob]) == [fr.event_id, bob.event_id]
        finally:
            close()
    finally:
        engine.dispose()



def test_a_replay_and_a_live_commit_of_one_user_do_not_deadlock(pg_db):
    """The spool's replay (record_logins) and the daemon's statement write
    the same user's rows -- a show-once alert's delivery and a new place --
    at once: they lock them in one order, so one waits for the other. The
    replay is held for 2 s just before its delivery insert (a trigger); in
    the order places-then-deliveries, the live statement took the delivery
    meanwhile, waited for the place, and PostgreSQL broke the deadlock."""
    import threading

    from app.db.writers import PostgresWriter
    engine = make_engine(pg_db)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION ll_test_pause() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF current_setting('lltest.pause', true) = 'on' THEN PERFORM pg_sleep(2); END IF; "
            "RETURN NEW; END $$")
        conn.exec_driver_sql("CREATE TRIGGER ll_test_pause BEFORE INSERT ON login_alert_deliveries "
                             "FOR EACH ROW EXECUTE FUNCTION ll_test_pause()")
    writer = PostgresWriter(engine)
    try:
        writer.write([record(at=T0, country="DE")])          # a user known from DE
        replayed = record(at=T0 + dt.timedelta(hours=1), country="FR", alerts_shown=(7,))
        live = record(at=T0 + dt.timedelta(hours=2), country="FR", protocol="pop3",
                      alerts_shown=(7,))
        errors: list[BaseException] = []

        def replay():
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql("SET LOCAL lltest.pause = 'on'")
                    record_logins(conn, [replayed])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        replaying = threading.Thread(target=replay)
        replaying.start()
        time.sleep(0.5)                     # the replay is inside its pause by now
        writer.write([live])
        replaying.join(timeout=30)
        assert errors == []
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.sum(last_logins.c.login_count))).scalar() == 3
            assert places(conn) == places_from_history(conn)
            assert conn.execute(sa.text("SELECT count(*) FROM login_alert_deliveries")).scalar() == 1
    finally:
        writer.close()
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER ll_test_pause ON login_alert_deliveries")
            conn.exec_driver_sql("DROP FUNCTION ll_test_pause()")
        engine.dispose()


@pytest.mark.parametrize("db_url", ["postgresql", "sqlite"], indirect=True)
def test_the_daily_job_adds_the_places_of_logins_stored_without_them(engine, caplog):
    """A login stored by a daemon of the release before login_places (still
    running on another host after the upgrade) has no place: the daily job
    adds it, so the user's next login from there is not new, and writes
    nothing when the table is whole."""
    import logging

    from app.maintenance import Maintenance
    now = dt.datetime.now(dt.timezone.utc)
    write, close = writing(engine, "writer")
    try:
        write([record(at=now - dt.timedelta(days=10), country="DE", asn=3320)])
        old = record(at=now - dt.timedelta(hours=5), country="FR", asn=3215)
        older = record(at=now - dt.timedelta(days=5), country="AT")     # past the window
        with engine.begin() as conn:        # as that release wrote them: no places
            for rec in (old, older):
                conn.execute(login_events.insert().values(**rec.event_row()))
            assert ("alice@example.com", "country", "FR", old.occurred_at) not in places(conn)
        with caplog.at_level(logging.WARNING, logger="lastlogin.maintenance"):
            Maintenance(engine, 0).run_once()
        assert [r.getMessage().split(" since=")[0] for r in caplog.records] == [
            "event=places_caught_up rows=2"]
        with engine.connect() as conn:
            assert ("alice@example.com", "country", "FR", old.occurred_at) in places(conn)
            assert ("alice@example.com", "asn", "3215", old.occurred_at) in places(conn)
            assert not any(p[2] == "AT" for p in places(conn))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lastlogin.maintenance"):
            Maintenance(engine, 0).run_once()
        assert caplog.records == []
        assert write([record(at=now, country="FR")]) == []
        at = record(at=now + dt.timedelta(seconds=1), country="AT")
        assert write([at]) == [at.event_id]         # beyond the window: AT stays unknown
    finally:
        close()


def test_the_catch_up_is_one_host_at_a_time_and_its_failure_stops_nothing_else(pg_db, caplog):
    """Another host holding the catch-up's lock: this one leaves it. A
    catch-up that fails (a trigger refuses the row) is one line, after the
    rest of the daily job, and the next run catches up."""
    import logging

    import psycopg

    from app.db.store import PLACES_LOCK_KEY
    from app.maintenance import Maintenance
    now = dt.datetime.now(dt.timezone.utc)
    engine = make_engine(pg_db)
    missing = record(at=now - dt.timedelta(hours=1), country="FR")
    with engine.begin() as conn:        # stored without its place
        conn.execute(login_events.insert().values(**missing.event_row()))
        conn.exec_driver_sql(
            "CREATE FUNCTION ll_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'refused by the test'; END $$")
        conn.exec_driver_sql("CREATE TRIGGER ll_test_refuse BEFORE INSERT ON login_places "
                             "FOR EACH ROW EXECUTE FUNCTION ll_test_refuse()")
    try:
        with psycopg.connect(pg_db.replace("postgresql+psycopg", "postgresql")) as other:
            other.execute("SELECT pg_advisory_xact_lock(%s)", (PLACES_LOCK_KEY,))
            with caplog.at_level(logging.INFO, logger="lastlogin.maintenance"):
                Maintenance(engine, 0).run_once()
            assert [r for r in caplog.records if "places" in r.getMessage()] == []
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lastlogin.maintenance"):
            Maintenance(engine, 0).run_once()
        assert [r.getMessage().split(" error=")[0] for r in caplog.records] == [
            "event=places_catch_up_failed"]
        assert "refused by the test" in caplog.records[0].getMessage()
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER ll_test_refuse ON login_places")
            conn.exec_driver_sql("DROP FUNCTION ll_test_refuse()")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lastlogin.maintenance"):
            Maintenance(engine, 0).run_once()
        assert [r.getMessage().split(" since=")[0] for r in caplog.records] == [
            "event=places_caught_up rows=1"]
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS ll_test_refuse ON login_places")
            conn.exec_driver_sql("DROP FUNCTION IF EXISTS ll_test_refuse()")
        engine.dispose()


@pytest.mark.parametrize("path", ["writer-arrays", "core"])
def test_writers_lock_users_in_code_point_order_whatever_the_collation(pg_cluster, path):
    """The batch statement and record_logins (the replayer) write -- and so
    lock -- the rows of several users in one order: code points, as Python
    sorts. In a database whose collation (ICU en-US here) orders the names
    otherwise, the statement's ORDER BY followed the collation, so a replay
    and a live batch could take two users' rows in opposite orders. The
    heap keeps the order rows were inserted in (ctid, in a new table)."""
    url = pg_cluster.create_database(
        "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'")
    upgrade(url)
    engine = make_engine(url)
    names = ["user.x@y", "user1@x", "user@x", "User@x"]
    with engine.connect() as conn:      # the case is real: the collation disagrees
        assert conn.exec_driver_sql(
            "SELECT array_agg(n ORDER BY n) FROM unnest(%(n)s::text[]) n", {"n": names}
        ).scalar() != sorted(names)
    write, close = writing(engine, path)
    try:
        write([record(n.encode(), at=T0 + dt.timedelta(seconds=i), country="FR", asn=3215,
                      alerts_shown=(7,)) for i, n in enumerate(reversed(names))])
        with engine.connect() as conn:
            for table in ("last_logins", "login_alert_deliveries", "login_places"):
                stored = [r[0] for r in conn.exec_driver_sql(
                    f"SELECT username FROM {table} ORDER BY ctid")]
                assert stored == sorted(stored) and set(stored) == set(names), table
    finally:
        close()
        engine.dispose()
