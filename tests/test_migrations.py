"""Migrations tested like code, on PostgreSQL and on SQLite."""

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from app.db import make_engine
from app.db.migrate import (current_revision, downgrade, ensure_at_head,
                            head_revision, SchemaNotCurrent, schema_differences,
                            script_location, upgrade)
from app.db.schema import is_partition, metadata
from tests.harness.schema import schema_diff, schema_snapshot


def revisions():
    """Oldest first."""
    return list(reversed(list(ScriptDirectory(script_location()).walk_revisions())))


def test_single_head():
    assert len(ScriptDirectory(script_location()).get_heads()) == 1


def test_every_step_up_and_down(empty_db_url):
    """Each migration upgrades, downgrades to its parent and upgrades again.

    The whole schema is compared, not only table names: the downgrade must
    give back exactly the parent's schema (a leftover view, index, trigger,
    function or column fails here), and the upgrade after it exactly the
    schema the first upgrade made."""
    engine = make_engine(empty_db_url)
    parent = schema_snapshot(empty_db_url)
    for rev in revisions():
        upgrade(empty_db_url, rev.revision)
        at_rev = schema_snapshot(empty_db_url)
        assert at_rev != parent, f"{rev.revision} changed nothing the snapshot sees"
        downgrade(empty_db_url, rev.down_revision or "base")
        assert current_revision(engine) == rev.down_revision
        assert schema_diff(parent, schema_snapshot(empty_db_url)) == [], \
            f"downgrade of {rev.revision} left a trace"
        upgrade(empty_db_url, rev.revision)
        assert schema_diff(at_rev, schema_snapshot(empty_db_url)) == [], \
            f"{rev.revision} upgraded again differs"
        assert current_revision(engine) == rev.revision
        parent = at_rev
    engine.dispose()


def test_migration_files_stand_alone():
    """Migrations never import the application (they must outlive its models)."""
    import pathlib
    for path in pathlib.Path(script_location(), "versions").glob("*.py"):
        text = path.read_text()
        assert "from app" not in text and "import app" not in text, path.name


def tables(url, partitions=False):
    engine = make_engine(url)
    try:
        names = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    return names if partitions else {n for n in names if not is_partition(n)}


def test_empty_to_head_to_base_to_head(empty_db_url):
    upgrade(empty_db_url)
    assert tables(empty_db_url) == {t.name for t in metadata.sorted_tables} | {"alembic_version"}
    engine = make_engine(empty_db_url)
    assert current_revision(engine) == head_revision()
    ensure_at_head(engine)
    assert schema_differences(engine) == []
    downgrade(empty_db_url, "base")
    # base means no table at all, Alembic's bookkeeping included
    assert tables(empty_db_url, partitions=True) == set()
    upgrade(empty_db_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_not_at_head_is_refused(empty_db_url):
    engine = make_engine(empty_db_url)
    with pytest.raises(SchemaNotCurrent, match="run `lastlogin db upgrade`"):
        ensure_at_head(engine)
    engine.dispose()


def test_drift_is_reported(empty_db_url):
    upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_last_logins_last_seen")
    diffs = schema_differences(engine)
    assert any("ix_last_logins_last_seen" in str(d) for d in diffs)
    engine.dispose()


def test_postgresql_uses_native_address_types(pg_url):
    engine = make_engine(pg_url)
    cols = {c["name"]: c["type"] for c in sa.inspect(engine).get_columns("login_events")}
    rules = {c["name"]: c["type"] for c in sa.inspect(engine).get_columns("access_rules")}
    engine.dispose()
    assert type(cols["remote_ip"]).__name__ == "INET"
    assert type(rules["remote_network"]).__name__ == "CIDR"
    assert cols["occurred_at"].timezone is True


def test_login_events_are_partitioned_by_month_on_postgresql(pg_cluster):
    import datetime as dt
    url = pg_cluster.create_database()
    # data written before the partitioning migration lands in its month
    upgrade(url, "10193d525acb")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO login_events (event_id, occurred_at, username, protocol, outcome) "
            "VALUES (gen_random_uuid(), '2024-03-15 10:00+00', 'old', 'imap', 'allowed')")
    upgrade(url)
    parts = {n for n in tables(url, partitions=True) if is_partition(n)}
    this_month = dt.date.today().strftime("%Y%m")
    assert {"login_events_p202403", f"login_events_p{this_month}",
            "login_events_pdefault"} <= parts
    with engine.connect() as conn:
        assert conn.exec_driver_sql(
            "SELECT username FROM login_events_p202403").scalars().all() == ["old"]
    assert schema_differences(engine) == []
    downgrade(url, "10193d525acb")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM login_events").scalar() == 1
    assert not any(is_partition(n) for n in tables(url, partitions=True))
    engine.dispose()


def test_the_revision_map_read_without_alembic_is_alembics():
    """Commands check the schema without importing Alembic (start-up time):
    the revision ids and the head read from the files are Alembic's own."""
    from alembic.script import ScriptDirectory
    from app.db.migrate import revisions, script_location
    script = ScriptDirectory(script_location())
    theirs = {r.revision: tuple(r._all_down_revisions) for r in script.walk_revisions()}
    assert revisions() == theirs and len(theirs) >= 9
    assert [head_revision()] == list(script.get_heads())
