"""`lastlogin user export|forget`: one user's data, for access and erasure requests."""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
import uuid
from typing import Any

import click

from ..db.privacy import export_user, forget_user
from ..errors import InvalidInput
from ..login import normalize_user
from .common import EXIT_PROBLEM, Context, edge, main_group, pass_ctx
from .output import csv_safe, json_safe, safe_text


@main_group.group()
def user() -> None:
    """One user's stored data: export it, or forget it.

    The user is matched as rules match logins: without surrounding blanks,
    case-insensitively (ASCII). Records still waiting in the outage spool
    are stored when the database is back: check `lastlogin status` first.
    """


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, uuid.UUID):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _name(username: str) -> str:
    username = normalize_user(username)
    if not username:
        raise InvalidInput("USERNAME", "must not be empty")
    return username


@user.command("export")
@click.argument("username")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json",
              show_default=True,
              help="json: one object, a list per table (`logins` first); csv: one row per "
                   "stored row, its table in the first column.")
@pass_ctx
@edge
def user_export(ctx: Context, username: str, fmt: str) -> None:
    """Everything stored about USERNAME: logins, last logins, alert deliveries,
    and the rules, overrides and alerts that name them.

    Exit status 1 when nothing is stored about them.
    """
    with ctx.begin() as conn:
        data = export_user(conn, _name(username))
    doc = {table: [{k: _plain(v) for k, v in row.items()} for row in rows]
           for table, rows in data.items()}
    if fmt == "json":
        sys.stdout.write(json_safe(json.dumps({"username": _name(username), **doc},
                                              ensure_ascii=False, indent=1)) + "\n")
    else:
        columns: list[str] = []
        for rows in doc.values():
            for row in rows:
                columns += [k for k in row if k not in columns]
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["table"] + columns)
        for table, rows in doc.items():
            for row in rows:
                w.writerow([table] + [_csv(row.get(c)) for c in columns])
    if not any(doc.values()):
        raise SystemExit(EXIT_PROBLEM)


def _csv(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return csv_safe(safe_text(value))
    return str(value)


@user.command("forget")
@click.argument("username")
@click.option("--yes", "assume_yes", is_flag=True, help="Really delete (required).")
@click.option("--with-config", is_flag=True,
              help="Also delete the rules, userdb overrides and alerts that name the user.")
@pass_ctx
@edge
def user_forget(ctx: Context, username: str, assume_yes: bool, with_config: bool) -> None:
    """Delete USERNAME's login history, last logins and alert deliveries (with
    --with-config also the rules, overrides and alerts naming them), in one
    transaction, and say how many rows went from each table."""
    name = _name(username)
    if not assume_yes:
        raise InvalidInput("--yes", f"deleting everything stored about {name!r} cannot be "
                                    "undone: give --yes")
    with ctx.begin() as conn:
        removed = forget_user(conn, name, with_config)
    for table, count in removed.items():
        click.echo(f"removed {count} rows from {table}")
    if not any(removed.values()):
        click.echo(f"lastlogin: nothing was stored about {safe_text(name)}", err=True)
