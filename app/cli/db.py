"""`lastlogin db ...`: the migration command (Alembic underneath)."""

from __future__ import annotations

import sys

import click

from ..db.migrate import (current_revision, downgrade as do_downgrade, head_revision,
                          history as do_history, schema_differences, state,
                          upgrade as do_upgrade)
from .common import EXIT_SCHEMA, Context, edge, fail, main_group, pass_ctx

EXIT_DRIFT = 1

# `db downgrade -1`: a relative revision is an argument, not an unknown option.
REVISION_SETTINGS = {"ignore_unknown_options": True}


@main_group.group()
def db() -> None:
    """Create and migrate the database schema."""


@db.command(context_settings=REVISION_SETTINGS)
@click.argument("revision", default="head")
@pass_ctx
@edge
def upgrade(ctx: Context, revision: str) -> None:
    """Migrate the database up to REVISION (default: head; +1 for one step)."""
    ctx.engine(check_schema=False, create=True).dispose()    # makes the SQLite directory
    do_upgrade(ctx.checked_url(), revision)
    engine = ctx.engine(check_schema=False)
    click.echo(f"database at {current_revision(engine) or 'base'}")
    engine.dispose()


@db.command(context_settings=REVISION_SETTINGS)
@click.argument("revision")
@pass_ctx
@edge
def downgrade(ctx: Context, revision: str) -> None:
    """Migrate the database down to REVISION (`base` removes every table; -1 one step)."""
    ctx.engine(check_schema=False).dispose()                  # refuses a missing SQLite file
    do_downgrade(ctx.checked_url(), revision)
    engine = ctx.engine(check_schema=False)
    click.echo(f"database at {current_revision(engine) or 'base'}")
    engine.dispose()


@db.command()
@pass_ctx
@edge
def current(ctx: Context) -> None:
    """Show the database's revision and whether it is the newest (creates nothing).

    Exit status 0 at head, 3 otherwise (behind, newer, or no database yet).
    """
    head = head_revision()
    if not ctx.database_exists():
        click.echo(f"base (behind, head is {head}; no database file at {ctx.sqlite_path()})")
        raise SystemExit(EXIT_SCHEMA)
    engine = ctx.engine(check_schema=False)
    try:
        rev = current_revision(engine)
    finally:
        engine.dispose()
    shown = {"head": "head", "behind": f"behind, head is {head}",
             "empty": f"behind, head is {head}",
             "newer": f"newer than this lastlogin knows, its head is {head}: "
                      "was lastlogin downgraded?"}[state(rev)]
    click.echo(f"{rev or 'base'} ({shown})")
    if state(rev) != "head":
        raise SystemExit(EXIT_SCHEMA)


@db.command()
@pass_ctx
@edge
def history(ctx: Context) -> None:
    """List the migrations, oldest last."""
    do_history(ctx.checked_url(), sys.stdout)


@db.command()
@pass_ctx
@edge
def check(ctx: Context) -> None:
    """Check that the database's tables match this version's models."""
    engine = ctx.engine()
    try:
        diffs = schema_differences(engine)
    finally:
        engine.dispose()
    if diffs:
        for d in diffs:
            click.echo(f"differs: {d}", err=True)
        fail(f"{len(diffs)} difference(s) between the database and the models", EXIT_DRIFT)
    click.echo("schema matches the models")
