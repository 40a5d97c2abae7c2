"""The command line: help everywhere, one-line errors, the db commands."""

from __future__ import annotations

import os
import subprocess
import sys

import click
import sqlalchemy as sa
from click.testing import CliRunner

from app import __version__
from app.cli import main_group
from app.db import make_engine
from app.db.migrate import head_revision, schema_differences
from tests.harness.cli import cli_env, lastlogin, spawn


def all_commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, prefix + (name,))


def test_every_command_has_help_text():
    seen = []
    for path, cmd in all_commands(main_group):
        assert cmd.help and len(cmd.help.strip()) > 20, path
        result = CliRunner().invoke(main_group, [*path, "--help"])
        assert result.exit_code == 0, path
        seen.append(" ".join(path))
    assert {"db", "db upgrade", "db downgrade", "db current", "db history", "db check",
            "serve"} <= set(seen)


def test_help_and_version():
    out = lastlogin("--help")
    assert out.returncode == 0
    for word in ("db", "serve"):
        assert f"  {word} " in out.stdout
    assert lastlogin("--version").stdout.strip() == f"lastlogin, version {__version__}"


def test_bad_setting_is_one_line_and_exit_2():
    out = lastlogin("db", "current", env={"LASTLOGIN_DATABASE_URL": "mysql://x/y"})
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "lastlogin: must start with sqlite:/// or "
        "postgresql+psycopg:// (got scheme 'mysql') (database_url)"]


def test_unreachable_database_is_one_line_and_exit_4():
    out = lastlogin("db", "current", env={
        "LASTLOGIN_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert out.returncode == 4
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("lastlogin: database error:")


def test_db_commands_round_trip(empty_db_url):
    env = {"LASTLOGIN_DATABASE_URL": empty_db_url}
    current = lastlogin("db", "current", env=env)
    assert current.returncode == 3 and current.stdout.startswith("base (behind")
    check = lastlogin("db", "check", env=env)
    assert check.returncode == 3 and "run `lastlogin db upgrade`" in check.stderr
    assert lastlogin("db", "upgrade", env=env).returncode == 0
    current = lastlogin("db", "current", env=env)
    assert current.returncode == 0 and current.stdout.endswith("(head)\n")
    check = lastlogin("db", "check", env=env)
    assert check.returncode == 0 and "schema matches" in check.stdout
    assert "create schema v1" in lastlogin("db", "history", env=env).stdout.lower()
    down = lastlogin("db", "downgrade", "base", env=env)
    assert down.returncode == 0, down.stderr
    engine = make_engine(empty_db_url)
    assert sa.inspect(engine).get_table_names() == []
    engine.dispose()


def test_alembic_itself_uses_the_same_settings(empty_db_url):
    env = cli_env({"LASTLOGIN_DATABASE_URL": empty_db_url})
    alembic = os.path.join(os.path.dirname(sys.executable), "alembic")
    out = subprocess.run([alembic, "upgrade", "head"], env=env, capture_output=True,
                         text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert lastlogin("db", "check", env={"LASTLOGIN_DATABASE_URL": empty_db_url}).returncode == 0


def test_concurrent_upgrades_take_turns_on_postgresql(pg_cluster):
    """Every host runs `db upgrade` before `serve`: two at once on one empty
    PostgreSQL both succeed (the advisory lock serialises them) and leave the
    schema at head exactly once, with no duplicate-object error."""
    url = pg_cluster.create_database()
    env = {"LASTLOGIN_DATABASE_URL": url}
    runs = [spawn("db", "upgrade", env=env) for _ in range(2)]
    results = [(p.wait(120), *p.communicate()) for p in runs]
    for rc, _out, err in results:
        assert rc == 0, err
        assert "already exists" not in err
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() \
            == [head_revision()]
        # the lock was released: nobody holds it after both commands ended
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())").scalar() == 0
    assert schema_differences(engine) == []
    engine.dispose()


def test_upgrade_makes_the_sqlite_directory(tmp_path):
    """A fresh machine: the embedded database's directory does not exist yet."""
    data = tmp_path / "not" / "yet"
    out = lastlogin("db", "upgrade", env={"LASTLOGIN_DATA_DIR": str(data)})
    assert out.returncode == 0, out.stderr
    assert (data / "lastlogin.db").exists()
    assert lastlogin("db", "check", env={"LASTLOGIN_DATA_DIR": str(data)}).returncode == 0


def test_serve_start_line_is_readable_and_hides_the_password():
    from app.cli.serve import start_line
    from app.config import load_settings
    settings = load_settings(None, {
        "LASTLOGIN_DATABASE_URL": "postgresql://ll:s3cret@db.example.com/lastlogin",
        "LASTLOGIN_SOCKET_DIR": "/run/ll", "LASTLOGIN_PROTOCOLS": "imap,pop3"})
    assert start_line(settings) == (
        f"lastlogin {__version__}: serving /run/ll/imap.sock, /run/ll/pop3.sock; "
        "database postgresql+psycopg://ll:***@db.example.com/lastlogin")
