"""`lastlogin report ...` and `lastlogin prune`: answers from the history."""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any, Callable

import click

from ..db import make_engine, reports
from ..db.migrate import ensure_at_head
from ..db.retention import affected, prune as do_prune
from ..timeparse import DURATION_HELP, localize, parse_duration, parse_since as since_of
from .common import EXIT_PROBLEM, EXIT_USAGE, Context, edge, fail, main_group, pass_ctx
from .common import utc_option
from .output import format_option, render


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def report_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = utc_option(fn)
    return format_option(fn)


def show(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str, utc: bool) -> None:
    """Print rows (times in the local zone unless --utc); exit 1 if there are none.

    When --limit cut the report, stderr says so, in every format (stdout
    stays pure CSV/JSON).
    """
    localize(rows, utc)
    render(rows, columns, fmt)
    total = getattr(rows, "total", None)
    if total is not None:
        click.echo(f"lastlogin: {len(rows):,} of {total:,} rows (use --limit 0 for all)",
                   err=True)
    if not rows:
        raise SystemExit(EXIT_PROBLEM)


def limit_option(fn):
    return click.option("--limit", type=click.IntRange(min=0, max=10**9), default=1000,
                        show_default=True,
                        help="At most this many rows (0: all); stderr says when rows "
                             "were left out.")(fn)


def host_option(fn):
    return click.option("--host", help="Only logins seen by this mail host (its host_name).")(fn)


def reading(ctx: Context):
    """A transaction where reports read: report_database_url (a standby) if set."""
    if not ctx.settings.report_database_url:
        return ctx.begin()
    engine = make_engine(ctx.settings.report_database_url)
    ensure_at_head(engine)
    return engine.begin()


def since_option(fn):
    return click.option("--since", metavar="TIME|DURATION",
                        help="From TIME (ISO 8601, local zone unless --utc or an offset) "
                             f"or DURATION ago ({DURATION_HELP}).")(fn)


def parse_since(text: str | None, default: dt.timedelta | None, utc: bool = False
                ) -> dt.datetime | None:
    if not text:
        return now_utc() - default if default else None
    return since_of(text, "--since", now_utc(), utc)


@main_group.group()
def report() -> None:
    """Who logged in, from where, who stopped, who was refused.

    Exit status: 0 when the report has rows, 1 when it has none, 2 and more
    on errors. Times are in the local zone unless --utc.
    """


@report.command("last")
@click.option("--user", help="Only this user.")
@click.option("--domain", help="Only users of this domain.")
@limit_option
@host_option
@report_options
@pass_ctx
@edge
def report_last(ctx: Context, user, domain, limit, host, fmt, utc) -> None:
    """Each user's last login over all protocols, newest first."""
    with reading(ctx) as conn:
        rows = reports.last(conn, user, domain, limit or None, host)
    show(rows, reports.LAST_COLUMNS, fmt, utc)


@report.command("inactive")
@click.option("--days", type=click.IntRange(min=1, max=36600), required=True,
              help="Report users whose last login is older than this.")
@click.option("--accounts", type=click.File("r"),
              help="File (or - for stdin) with every account, one per line, e.g. from "
                   "`doveadm user '*'`; accounts that never logged in are reported too.")
@report_options
@pass_ctx
@edge
def report_inactive(ctx: Context, days, accounts, fmt, utc) -> None:
    """Accounts with no login for more than --days days."""
    names = None
    if accounts is not None:
        names = [ln.strip() for ln in accounts if ln.strip() and not ln.startswith("#")]
    with reading(ctx) as conn:
        rows = reports.inactive(conn, days, now_utc(), names)
    show(rows, reports.INACTIVE_COLUMNS, fmt, utc)


@report.command("history")
@click.argument("username")
@since_option
@limit_option
@host_option
@report_options
@pass_ctx
@edge
def report_history(ctx: Context, username, since, limit, host, fmt, utc) -> None:
    """One user's logins, allowed and refused, newest first."""
    start = parse_since(since, None, utc)
    with reading(ctx) as conn:
        rows = reports.history(conn, username, start, limit or None, host)
    show(rows, reports.HISTORY_COLUMNS, fmt, utc)


@report.command("ips")
@click.argument("username")
@report_options
@pass_ctx
@edge
def report_ips(ctx: Context, username, fmt, utc) -> None:
    """The client addresses a user logged in from, with first and last use."""
    with reading(ctx) as conn:
        rows = reports.ips(conn, username)
    show(rows, reports.IPS_COLUMNS, fmt, utc)


@report.command("refused")
@since_option
@limit_option
@host_option
@report_options
@pass_ctx
@edge
def report_refused(ctx: Context, since, limit, host, fmt, utc) -> None:
    """Refused logins (default: the last 7 days) with the rule and its message."""
    start = parse_since(since, dt.timedelta(days=7), utc)
    with reading(ctx) as conn:
        rows = reports.refused(conn, start, limit or None, host)
    show(rows, reports.REFUSED_COLUMNS, fmt, utc)


@report.command("new-locations")
@since_option
@click.option("--user", help="Only this user's logins (the username as stored).")
@limit_option
@report_options
@pass_ctx
@edge
def report_new_locations(ctx: Context, since, user, limit, fmt, utc) -> None:
    """Logins from a country (or, without one, an ASN) new for their user
    (default: the last 7 days); needs a GeoIP database (docs/geoip.md)."""
    start = parse_since(since, dt.timedelta(days=7), utc)
    with reading(ctx) as conn:
        rows = reports.new_locations(conn, start, user, limit or None)
    show(rows, reports.NEW_LOCATION_COLUMNS, fmt, utc)


@report.command("failed")
@since_option
@click.option("--by", type=click.Choice(["ip", "user"]), default="ip", show_default=True,
              help="One row per client address, or per username.")
@limit_option
@host_option
@report_options
@pass_ctx
@edge
def report_failed(ctx: Context, since, by, limit, host, fmt, utc) -> None:
    """Failed authentications (default: the last 24 hours), most first.

    Reported by Dovecot's auth policy client (docs/policy-server.md): who is
    guessing passwords, and from where.
    """
    start = parse_since(since, dt.timedelta(days=1), utc)
    with reading(ctx) as conn:
        rows = reports.failed(conn, start, by, limit or None, host)
    show(rows, reports.FAILED_BY_IP_COLUMNS if by == "ip" else reports.FAILED_BY_USER_COLUMNS,
         fmt, utc)


@report.command("daily")
@click.option("--days", type=click.IntRange(min=1, max=3660), default=7, show_default=True)
@host_option
@click.option("--by-host", is_flag=True, help="A row per mail host too.")
@report_options
@pass_ctx
@edge
def report_daily(ctx: Context, days, host, by_host, fmt, utc) -> None:
    """Logins per day and protocol (and mail host), allowed and refused."""
    zone = dt.timezone.utc if utc else dt.datetime.now().astimezone().tzinfo
    with reading(ctx) as conn:
        rows = reports.daily(conn, days, now_utc(), zone, host, by_host)
    show(rows, reports.DAILY_HOST_COLUMNS if by_host else reports.DAILY_COLUMNS, fmt, utc)


@main_group.command()
@click.option("--older-than", "older_than", required=True, metavar="DURATION",
              help=f"Remove login history older than this ({DURATION_HELP}; "
                   "`m` is refused as ambiguous).")
@click.option("--dry-run", is_flag=True,
              help="Only say how many login events would go, and their oldest and newest.")
@click.option("--yes", "-y", "assume_yes", is_flag=True,
              help="Do not ask for confirmation (for cron).")
@click.option("--batch", type=click.IntRange(min=100, max=1_000_000), default=10_000,
              show_default=True, help="Rows deleted per transaction.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: when stderr is a terminal).")
@utc_option
@pass_ctx
@edge
def prune(ctx: Context, older_than: str, dry_run: bool, assume_yes: bool, batch: int,
          progress: bool | None, utc: bool) -> None:
    """Remove old login history in bounded batches (last_logins is kept).

    Asks for confirmation, showing how many events go, unless --yes; with
    --dry-run it only shows them. On PostgreSQL whole months go at once
    (the table is partitioned by month); the rest is deleted in short
    transactions of --batch rows, so the daemon keeps recording logins
    meanwhile.
    """
    cutoff = now_utc() - parse_duration(older_than, "--older-than")
    zone = dt.timezone.utc if utc else None
    shown_cutoff = cutoff.astimezone(zone).isoformat(timespec="seconds")
    engine = ctx.engine()
    try:
        with engine.connect() as conn:
            what = affected(conn, cutoff)
        if what.rows == 0:
            click.echo(f"no login events older than {shown_cutoff}")
            return
        oldest = what.oldest.astimezone(zone).isoformat(timespec="seconds")
        newest = what.newest.astimezone(zone).isoformat(timespec="seconds")
        summary = (f"{what.rows} login events older than {shown_cutoff} "
                   f"(oldest {oldest}, newest {newest})")
        if dry_run:
            click.echo(f"would remove {summary}")
            return
        if not assume_yes:
            if not sys.stdin.isatty():
                fail(f"not removing {summary} without confirmation: give --yes (or run "
                     "it on a terminal)", EXIT_USAGE)
            try:
                ok = click.confirm(f"remove {summary}?", err=True)
            except click.Abort:
                ok = False
            if not ok:
                fail("nothing removed", EXIT_PROBLEM)
        result = _prune_with_bar(engine, cutoff, batch, progress)
    finally:
        engine.dispose()
    click.echo(f"removed {result.rows_dropped + result.rows_deleted} login events older "
               f"than {shown_cutoff} "
               f"({len(result.partitions)} monthly partitions dropped, "
               f"{result.rows_deleted} rows deleted in batches)")


def _prune_with_bar(engine, cutoff: dt.datetime, batch: int, progress: bool | None):
    show_bar = sys.stderr.isatty() if progress is None else progress
    bar_holder: dict[str, Any] = {}

    def on_total(total: int) -> None:
        if show_bar:
            bar_holder["bar"] = click.progressbar(length=total, label="deleting",
                                                  file=sys.stderr)
            bar_holder["bar"].__enter__()

    def step(n: int) -> None:
        if "bar" in bar_holder:
            bar_holder["bar"].update(n)

    try:
        return do_prune(engine, cutoff, batch, step, on_total)
    finally:
        if "bar" in bar_holder:
            bar_holder["bar"].__exit__(None, None, None)
