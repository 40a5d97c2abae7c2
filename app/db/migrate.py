"""The migration command's library side: Alembic, configured in code."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from .schema import include_name, metadata

FILE_TEMPLATE = ("%%(year)d_%%(month).2d_%%(day).2d_%%(hour).2d%%(minute).2d"
                 "-%%(rev)s_%%(slug)s")


class SchemaNotCurrent(Exception):
    """The database is not at the newest migration."""


class SchemaNewer(SchemaNotCurrent):
    """The database is at a revision this lastlogin does not know (it was downgraded)."""

    def __init__(self, revision: str) -> None:
        super().__init__(f"the database is at revision {revision}, newer than this lastlogin "
                         "knows (was lastlogin downgraded?)")
        self.revision = revision


class BadRevision(ValueError):
    """A revision given to upgrade/downgrade that Alembic cannot use."""


def script_location() -> str:
    """migrations/ in a checkout, app/migrations in an installed wheel."""
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").exists():
        return str(checkout)
    spec = importlib.util.find_spec("app.migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the migration scripts are not installed")
    return list(spec.submodule_search_locations)[0]


def alembic_config(url: str, stdout: io.TextIOBase | None = None) -> Config:
    cfg = Config(stdout=stdout) if stdout is not None else Config()
    cfg.set_main_option("script_location", script_location())
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.set_main_option("file_template", FILE_TEMPLATE)
    cfg.set_main_option("timezone", "UTC")
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory(script_location()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads; expected one")
    return heads[0]


def current_revision_of(conn: sa.Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return current_revision_of(conn)


def is_known(revision: str) -> bool:
    """Is ``revision`` one of this version's migrations?"""
    try:
        return ScriptDirectory(script_location()).get_revision(revision) is not None
    except Exception:   # alembic raises several kinds for an unknown id
        return False


def state(current: str | None) -> str:
    """``head``, ``behind``, ``empty`` or ``newer`` (unknown to this version)."""
    if current is None:
        return "empty"
    if current == head_revision():
        return "head"
    return "behind" if is_known(current) else "newer"


def ensure_at_head(engine: sa.Engine) -> None:
    """Raise SchemaNotCurrent unless the database is at the newest migration.

    A revision this version does not know is newer (lastlogin was rolled
    back): upgrading cannot help, so the message does not advise it.
    """
    head = head_revision()
    current = current_revision(engine)
    if current is not None and current != head and not is_known(current):
        raise SchemaNewer(current)
    if current != head:
        shown = current or "empty (no migration applied)"
        raise SchemaNotCurrent(
            f"database schema is {shown}, this lastlogin needs {head}: "
            "run `lastlogin db upgrade`")


def _refuse_newer(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    if current is not None and not is_known(current):
        raise SchemaNewer(current)


def _alembic(fn, url: str, revision: str) -> None:
    _refuse_newer(url)
    try:
        fn(alembic_config(url), revision)
    except CommandError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown revision"
        raise BadRevision(first) from None


def upgrade(url: str, revision: str = "head") -> None:
    _alembic(command.upgrade, url, revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate down; at ``base`` Alembic's own bookkeeping table goes too."""
    _alembic(command.downgrade, url, revision)
    if revision == "base":
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                if current_revision_of(conn) is None:
                    conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
        finally:
            engine.dispose()


def history(url: str, stdout: io.TextIOBase) -> None:
    command.history(alembic_config(url, stdout), indicate_current=False)


def schema_differences(engine: sa.Engine) -> list[object]:
    """What differs between the tables in the database and app.db.schema."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "target_metadata": metadata,
                        "include_name": include_name})
        return compare_metadata(ctx, metadata)
