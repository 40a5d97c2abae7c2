"""The migration command's library side: Alembic, configured in code.

Alembic itself is imported only by what migrates or compares (upgrade,
downgrade, history, schema_differences): it costs every other command
about 0.4 s of start-up. Checking that a database is at head -- what nearly
every command does first -- reads the revision ids from the migration
files and the ``alembic_version`` row directly; tests/test_migrations.py
holds that to Alembic's own answer.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import io
from pathlib import Path

import sqlalchemy as sa

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


def alembic_config(url: str, stdout: io.TextIOBase | None = None):
    from alembic.config import Config
    cfg = Config(stdout=stdout) if stdout is not None else Config()
    cfg.set_main_option("script_location", script_location())
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.set_main_option("file_template", FILE_TEMPLATE)
    cfg.set_main_option("timezone", "UTC")
    return cfg


@functools.lru_cache(maxsize=None)
def revisions() -> dict[str, tuple[str, ...]]:
    """Every migration's revision id -> the ids it follows, from the files'
    ``revision`` and ``down_revision`` assignments (literals, as Alembic writes them)."""
    out: dict[str, tuple[str, ...]] = {}
    for path in sorted(Path(script_location(), "versions").glob("*.py")):
        values = {}
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id in ("revision", "down_revision")):
                values[node.targets[0].id] = ast.literal_eval(node.value)
        if "revision" not in values:
            continue                                    # __init__.py
        down = values.get("down_revision")
        out[values["revision"]] = (() if down is None else
                                   tuple(down) if isinstance(down, (tuple, list)) else (down,))
    return out


def head_revision() -> str:
    known = revisions()
    followed = {d for downs in known.values() for d in downs}
    heads = [r for r in known if r not in followed]
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads; expected one")
    return heads[0]


def current_revision_of(conn: sa.Connection) -> str | None:
    """The revision in ``alembic_version``; None when there is none (or no table)."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) > 1:
        raise RuntimeError(f"the database has {len(rows)} schema revisions; expected one")
    return rows[0] if rows else None


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return current_revision_of(conn)


def is_known(revision: str) -> bool:
    """Is ``revision`` one of this version's migrations?"""
    return revision in revisions()


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
    from alembic.util import CommandError
    _refuse_newer(url)
    try:
        fn(alembic_config(url), revision)
    except CommandError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown revision"
        raise BadRevision(first) from None


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command
    _alembic(command.upgrade, url, revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate down; at ``base`` Alembic's own bookkeeping table goes too."""
    from alembic import command
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
    from alembic import command
    command.history(alembic_config(url, stdout), indicate_current=False)


def schema_differences(engine: sa.Engine) -> list[object]:
    """What differs between the tables in the database and app.db.schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "target_metadata": metadata,
                        "include_name": include_name})
        return compare_metadata(ctx, metadata)
