"""`lastlogin status`: is everything a login needs in place? (for monitoring)"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import click
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from ..db import make_engine
from ..db.migrate import SchemaNotCurrent, ensure_at_head
from ..snapshot import status_checks
from ..spool import Quarantine, Spool
from .common import Context, edge, main_group, pass_ctx

OK, WARNING, CRITICAL = 0, 1, 2
LEVEL = {OK: "ok", WARNING: "warning", CRITICAL: "critical"}
STATUS_MAX_AGE = 15.0       # the daemon rewrites its status file every 2 s
RULES_MAX_AGE = 60.0


def _socket_ok(path: str) -> str | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        s.close()


def checks(settings) -> list[tuple[int, str, str]]:
    out: list[tuple[int, str, str]] = []
    for proto in settings.protocols:
        path = settings.socket_path(proto)
        err = _socket_ok(path)
        out.append((CRITICAL, f"socket {proto}", f"{path}: {err}") if err
                   else (OK, f"socket {proto}", path))
    daemon = _daemon_state(settings)
    if daemon is None:
        out.append((CRITICAL, "daemon", "no current status file (is `lastlogin serve` running?)"))
    else:
        out.append((OK, "daemon", f"pid {daemon['pid']}, {daemon['committed']} committed, "
                                  f"{daemon['spooled']} spooled, {daemon['dropped']} dropped"))
        if daemon.get("refusing"):
            out.append((CRITICAL, "logins", "logins are being refused (spool full: "
                                            f"{daemon['refusing']})"))
        elif daemon.get("unrecorded"):
            out.append((CRITICAL, "logins", "logins are allowed but not recorded (spool full: "
                                            f"{daemon['unrecorded']})"))
        age = daemon.get("config_checked_age")
        if age is None or age > RULES_MAX_AGE:
            shown = "never loaded" if age is None else f"last confirmed {age:.0f} s ago"
            out.append((WARNING, "rules", shown))
        else:
            out.append((OK, "rules", f"{daemon['rules']} rules, version "
                                     f"{daemon['config_version']}, confirmed {age:.0f} s ago"))
        out += status_checks(daemon)     # rows the loader left out, load errors
    out.append(_database(settings.effective_database_url))
    spool_dir = settings.effective_spool_dir
    depth = Spool(spool_dir, settings.spool_max_bytes).depth() if os.path.isdir(spool_dir) else 0
    out.append((WARNING if depth else OK, "spool", f"{depth} records waiting in {spool_dir}"))
    quarantine = Quarantine(Path(spool_dir) / "quarantine")
    held = quarantine.count()
    if held:
        out.append((WARNING, "quarantine", f"{held} records set aside in {quarantine.path} "
                                           "(see docs/reliability.md)"))
    return out


def _database(url: str) -> tuple[int, str, str]:
    """Reachable and at head? Looks only: never creates an SQLite file."""
    try:
        make_url(url).port
        path = _sqlite_file(url)
    except (ValueError, sa.exc.ArgumentError) as exc:
        return CRITICAL, "database", f"not a database URL: {exc}"
    if path is not None and not os.path.isfile(path):
        return CRITICAL, "database", f"no database at {path}: run `lastlogin db upgrade`"
    engine = make_engine(url, connect_timeout=3)
    try:
        ensure_at_head(engine)
        return OK, "database", "reachable, schema at head"
    except SchemaNotCurrent as exc:
        return CRITICAL, "database", str(exc)
    except sa.exc.DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        return WARNING, "database", f"unreachable ({first}); logins are spooled"
    finally:
        engine.dispose()


def _sqlite_file(url: str) -> str | None:
    """The SQLite file behind ``url`` (status only looks; it never creates one)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return os.path.abspath(parsed.database)


def _daemon_state(settings) -> dict | None:
    path = os.path.join(settings.socket_dir, "status.json")
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    if time.time() - doc.get("written_at", 0) > STATUS_MAX_AGE:
        return None
    try:
        os.kill(int(doc["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError):
        return None
    except PermissionError:
        pass                        # alive, run by another user
    return doc


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
