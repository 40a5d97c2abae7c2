"""`lastlogin import ...`: backfill from what a site had before."""

from __future__ import annotations

import datetime as dt
import os
import sys

import click

from ..importer import (DamagedLog, SourceError, SourceUnreachable, import_last_login_table,
                        import_logs, source_engine)
from ..login import PROTOCOLS
from ..timeparse import DURATION_HELP, parse_since
from .common import (EXIT_DATABASE, EXIT_USAGE, CliError, Context, edge, flag_of, main_group,
                     pass_ctx)
from .output import safe_text


@main_group.group("import")
def import_() -> None:
    """Backfill the history from Dovecot's logs or the last_login plugin's table."""


def _readable(files: tuple[str, ...]) -> None:
    for f in files:
        if not os.access(f, os.R_OK):
            raise CliError(f"cannot read {f}: permission denied", "FILES", EXIT_USAGE)


@import_.command("dovecot-log")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--utc", is_flag=True,
              help="Stamps without a zone, --since and --until are UTC (default: local time).")
@click.option("--year", type=click.IntRange(1990, 2100),
              help="Year of syslog stamps (default: the file's, from its mtime).")
@click.option("--since", metavar="TIME|DURATION",
              help=f"Only logins from TIME (ISO 8601) or DURATION ago ({DURATION_HELP}).")
@click.option("--until", metavar="TIME|DURATION",
              help="Only logins before TIME or DURATION ago.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: when stderr is a terminal).")
@pass_ctx
@edge
def import_dovecot_log(ctx: Context, files, utc, year, since, until, progress) -> None:
    """Read `Login: user=<...>` lines from Dovecot log FILES (plain or gzip).

    A login followed by the mail process's `Post-login script denied access`
    line is stored as refused. Logins the daemon already recorded (same
    user, protocol and client address within 5 seconds) are skipped, so an
    import over a recorded period counts nothing twice; running it twice
    over the same lines stores nothing new. Users with an empty name are
    skipped.
    """
    now = dt.datetime.now(dt.timezone.utc)
    start = parse_since(since, "--since", now, utc) if since else None
    end = parse_since(until, "--until", now, utc) if until else None
    if start and end and end <= start:
        raise CliError("--until is not after --since", "--until", EXIT_USAGE)
    _readable(files)
    engine = ctx.engine()
    zone = dt.timezone.utc if utc else None
    show = sys.stderr.isatty() if progress is None else progress
    total = sum(os.path.getsize(f) for f in files)
    try:
        if show:
            with click.progressbar(length=total, label="importing", file=sys.stderr) as bar:
                stats = import_logs(engine, list(files), zone, year, bar.update, start, end)
        else:
            stats = import_logs(engine, list(files), zone, year, None, start, end)
    except DamagedLog as exc:
        raise CliError(str(exc), "FILES", EXIT_USAGE) from None
    finally:
        engine.dispose()
    extra = []
    if stats.outside:
        extra.append(f"{stats.outside} outside --since/--until")
    if stats.empty_user:
        extra.append(f"{stats.empty_user} with an empty user skipped")
    click.echo(f"{stats.files} file(s), {stats.lines} lines: {stats.logins} logins "
               f"({stats.refused} refused); {stats.new} new, {stats.already} already "
               f"recorded; {stats.unparsable} unparsable lines"
               + "".join(f"; {e}" for e in extra))
    for example in stats.examples:
        click.echo(f"unparsable: {safe_text(example)}", err=True)   # lines from outside


SOURCE_URL_ENV = "LASTLOGIN_IMPORT_SOURCE_URL"


def source_url_from(url_file: str | None) -> tuple[str, str]:
    """The source database URL and where it came from: --source-url-file or
    $LASTLOGIN_IMPORT_SOURCE_URL, never the command line (where every local
    user sees it in ps). ``source_engine`` checks it."""
    from ..config import ConfigError
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
    return url, where


@import_.command("last-login-table")
@click.option("--source-url-file", type=click.Path(dir_okay=False),
              help=f"File holding the plugin database's URL (default: ${SOURCE_URL_ENV}).")
@click.option("--table", default="last_login", show_default=True)
@click.option("--user-column", default="userid", show_default=True)
@click.option("--time-column", default="last_login", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "s", "ms", "us", "ns"]),
              default="auto", show_default=True,
              help="last_login_precision of the plugin; auto tells them apart by size.")
@click.option("--protocol", type=click.Choice(PROTOCOLS),
              default="imap", show_default=True,
              help="The plugin does not record one; its rows land under this.")
@pass_ctx
@edge
def import_last_login(ctx: Context, source_url_file, table, user_column, time_column,
                      precision, protocol) -> None:
    """Take over the rows of Dovecot's last_login plugin (its dict-sql table).

    The plugin database's URL (it holds a password) is read from
    $LASTLOGIN_IMPORT_SOURCE_URL or from the file --source-url-file names,
    never from the command line: sqlite:///PATH, postgresql://USER@HOST/DB or
    mysql://USER:PASSWORD@HOST/DB (MySQL and MariaDB).
    """
    source_url, where = source_url_from(source_url_file)
    try:
        source = source_engine(source_url, where)
    except SourceError as exc:
        raise CliError(exc.reason, flag_of(exc.option), EXIT_USAGE) from None
    try:
        target = ctx.engine()
        try:
            result = import_last_login_table(source, target, table, user_column,
                                             time_column, precision, protocol)
        finally:
            target.dispose()
    except SourceError as exc:
        raise CliError(exc.reason, flag_of(exc.option), EXIT_USAGE) from None
    except SourceUnreachable as exc:
        raise CliError(f"source database error: {exc}", where, EXIT_DATABASE) from None
    finally:
        source.dispose()
    click.echo(f"{result.rows} rows read, {result.imported} folded into last_logins, "
               f"{result.skipped} skipped (no user or time); precision {result.precision}")
