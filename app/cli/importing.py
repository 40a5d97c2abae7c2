"""`lastlogin import ...`: backfill from what a site had before."""

from __future__ import annotations

import datetime as dt
import os
import sys

import click

from ..db import make_engine
from ..importer import import_last_login_table, import_logs
from .common import Context, edge, main_group, pass_ctx


@main_group.group("import")
def import_() -> None:
    """Backfill the history from Dovecot's logs or the last_login plugin's table."""


@import_.command("dovecot-log")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--utc", is_flag=True, help="Stamps without a zone are UTC (default: local time).")
@click.option("--year", type=click.IntRange(1990, 2100),
              help="Year of syslog stamps (default: the file's, from its mtime).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: when stderr is a terminal).")
@pass_ctx
@edge
def import_dovecot_log(ctx: Context, files, utc, year, progress) -> None:
    """Read `Login: user=<...>` lines from Dovecot log FILES (plain or gzip).

    A login followed by the mail process's `Post-login script denied access`
    line is stored as refused. Running it twice over the same lines stores
    nothing new.
    """
    engine = ctx.engine()
    zone = dt.timezone.utc if utc else None
    show = sys.stderr.isatty() if progress is None else progress
    total = sum(os.path.getsize(f) for f in files)
    try:
        if show:
            with click.progressbar(length=total, label="importing", file=sys.stderr) as bar:
                stats = import_logs(engine, list(files), zone, year, bar.update)
        else:
            stats = import_logs(engine, list(files), zone, year)
    finally:
        engine.dispose()
    click.echo(f"{stats.files} file(s), {stats.lines} lines: {stats.logins} logins "
               f"({stats.refused} refused); {stats.new} new, {stats.already} already "
               f"imported; {stats.unparsable} unparsable lines")
    for example in stats.examples:
        click.echo(f"unparsable: {example}", err=True)


@import_.command("last-login-table")
@click.argument("source_url")
@click.option("--table", default="last_login", show_default=True)
@click.option("--user-column", default="userid", show_default=True)
@click.option("--time-column", default="last_login", show_default=True)
@click.option("--precision", type=click.Choice(["s", "ms", "us", "ns"]), default="s",
              show_default=True, help="last_login_precision of the plugin.")
@click.option("--protocol", type=click.Choice(["imap", "pop3", "submission", "managesieve"]),
              default="imap", show_default=True,
              help="The plugin does not record one; its rows land under this.")
@pass_ctx
@edge
def import_last_login(ctx: Context, source_url, table, user_column, time_column, precision,
                      protocol) -> None:
    """Take over the rows of Dovecot's last_login plugin (dict-sql table at SOURCE_URL)."""
    if source_url.startswith("postgresql://"):
        source_url = "postgresql+psycopg://" + source_url[len("postgresql://"):]
    target = ctx.engine()
    source = make_engine(source_url)
    try:
        result = import_last_login_table(source, target, table, user_column, time_column,
                                         precision, protocol)
    finally:
        source.dispose()
        target.dispose()
    click.echo(f"{result.rows} rows read, {result.imported} folded into last_logins, "
               f"{result.skipped} skipped (no user or time)")
