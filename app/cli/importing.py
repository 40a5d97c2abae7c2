"""`lastlogin import ...`: backfill from what a site had before."""

from __future__ import annotations

import datetime as dt
import os
import sys

import click

from ..db import make_engine
from ..importer import import_last_login_table, import_logs
from .common import Context, edge, main_group, pass_ctx
from .output import safe_text


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
        click.echo(f"unparsable: {safe_text(example)}", err=True)   # lines from outside


SOURCE_URL_ENV = "LASTLOGIN_IMPORT_SOURCE_URL"


def source_url_from(url_file: str | None) -> str:
    """The source database URL: from --source-url-file or $LASTLOGIN_IMPORT_SOURCE_URL,
    never from the command line (where every local user sees it in ps)."""
    from ..config import ConfigError, _database_url
    if url_file:
        try:
            with open(url_file, encoding="utf-8") as fh:
                url = fh.read().strip()
        except OSError as exc:
            raise ConfigError("--source-url-file", f"cannot read {url_file}: "
                              f"{exc.strerror}") from None
        where = "--source-url-file"
    else:
        url = os.environ.get(SOURCE_URL_ENV, "").strip()
        where = SOURCE_URL_ENV
    if not url:
        raise ConfigError(where, f"no source URL: put it in the environment variable "
                                 f"{SOURCE_URL_ENV} or in a file named by --source-url-file")
    try:
        return _database_url(url)
    except ValueError as exc:
        raise ConfigError(where, str(exc)) from None


@import_.command("last-login-table")
@click.option("--source-url-file", type=click.Path(dir_okay=False),
              help=f"File holding the plugin database's URL (default: ${SOURCE_URL_ENV}).")
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
def import_last_login(ctx: Context, source_url_file, table, user_column, time_column,
                      precision, protocol) -> None:
    """Take over the rows of Dovecot's last_login plugin (its dict-sql table).

    The plugin database's URL (it holds a password) is read from
    $LASTLOGIN_IMPORT_SOURCE_URL or from the file --source-url-file names,
    never from the command line.
    """
    source_url = source_url_from(source_url_file)
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
