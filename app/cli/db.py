"""`lastlogin db ...`: the migration command (Alembic underneath)."""

from __future__ import annotations

import sys

import click

from ..db.migrate import (current_revision, downgrade as do_downgrade, head_revision,
                          history as do_history, schema_differences,
                          upgrade as do_upgrade)
from .common import Context, edge, fail, main_group, pass_ctx

EXIT_DRIFT = 1


@main_group.group()
def db() -> None:
    """Create and migrate the database schema."""


@db.command()
@click.argument("revision", default="head")
@pass_ctx
@edge
def upgrade(ctx: Context, revision: str) -> None:
    """Migrate the database up to REVISION (default: head)."""
    do_upgrade(ctx.settings.effective_database_url, revision)
    click.echo(f"database at {current_revision(ctx.engine(check_schema=False)) or 'base'}")


@db.command()
@click.argument("revision")
@pass_ctx
@edge
def downgrade(ctx: Context, revision: str) -> None:
    """Migrate the database down to REVISION (`base` removes every table)."""
    do_downgrade(ctx.settings.effective_database_url, revision)
    click.echo(f"database at {current_revision(ctx.engine(check_schema=False)) or 'base'}")


@db.command()
@pass_ctx
@edge
def current(ctx: Context) -> None:
    """Show the database's revision and whether it is the newest."""
    rev = current_revision(ctx.engine(check_schema=False))
    head = head_revision()
    state = "head" if rev == head else f"behind, head is {head}"
    click.echo(f"{rev or 'base'} ({state})")


@db.command()
@pass_ctx
@edge
def history(ctx: Context) -> None:
    """List the migrations, oldest last."""
    do_history(ctx.settings.effective_database_url, sys.stdout)


@db.command()
@pass_ctx
@edge
def check(ctx: Context) -> None:
    """Check that the database's tables match this version's models."""
    engine = ctx.engine()
    diffs = schema_differences(engine)
    if diffs:
        for d in diffs:
            click.echo(f"differs: {d}", err=True)
        fail(f"{len(diffs)} difference(s) between the database and the models", EXIT_DRIFT)
    click.echo("schema matches the models")
