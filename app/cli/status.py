"""`lastlogin status`: is everything a login needs in place? (for monitoring)"""

from __future__ import annotations

import json

import click

from ..health import LEVEL, checks
from .common import Context, edge, main_group, pass_ctx


@main_group.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@pass_ctx
@edge
def status(ctx: Context, fmt: str) -> None:
    """Check sockets, daemon, database, schema, spool and rules, for monitoring.

    Exit status like a Nagios plugin: 0 all ok, 1 warning (database away and
    logins spooled, records waiting, rules not confirmed lately), 2 critical
    (a socket does not answer, no daemon, schema not at head).
    """
    results = checks(ctx.settings)
    worst = max(level for level, _, _ in results)
    if fmt == "json":
        click.echo(json.dumps({"status": LEVEL[worst], "checks": [
            {"status": LEVEL[lv], "check": name, "detail": detail}
            for lv, name, detail in results]}, indent=1))
    else:
        for level, name, detail in results:
            click.echo(f"{LEVEL[level]:8} {name:16} {detail}")
    raise SystemExit(worst)
