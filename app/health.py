"""Is everything a login needs in place? The facts behind `lastlogin status`.

The library gathers them (sockets answer, a daemon runs and says how it
does, the database is reachable and at head, the spool and the quarantine
are empty); the CLI only renders them. Levels are Nagios': 0 ok, 1 warning,
2 critical.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from .config import ConfigError, redact_url
from .db import make_engine
from .db.migrate import SchemaNotCurrent, ensure_at_head
from .snapshot import status_checks
from .geoip import GeoIP, GeoIPError
from .spool import Quarantine, Spool
from .status import DaemonStatus, read_status

OK, WARNING, CRITICAL = 0, 1, 2
LEVEL = {OK: "ok", WARNING: "warning", CRITICAL: "critical"}
RULES_MAX_AGE = 60.0

Check = tuple[int, str, str]        # (level, what, detail)


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


def checks(settings) -> list[Check]:
    out: list[tuple[int, str, str]] = []
    for proto in settings.protocols:
        path = settings.socket_path(proto)
        err = _socket_ok(path)
        out.append((CRITICAL, f"socket {proto}", f"{path}: {err}") if err
                   else (OK, f"socket {proto}", path))
    daemon = _running(settings)
    if daemon is None:
        out.append((CRITICAL, "daemon", "no current status file (is `lastlogin serve` running?)"))
    else:
        out.append((OK, "daemon", f"pid {daemon.pid}, {daemon.committed} committed, "
                                  f"{daemon.spooled} spooled, {daemon.dropped} dropped"))
        if daemon.refusing:
            out.append((CRITICAL, "logins", "logins are being refused (spool full: "
                                            f"{daemon.refusing})"))
        elif daemon.unrecorded:
            out.append((CRITICAL, "logins", "logins are allowed but not recorded (spool full: "
                                            f"{daemon.unrecorded})"))
        age = daemon.config_checked_age
        if daemon.database and daemon.database != redact_url(settings.effective_database_url):
            out.append((WARNING, "settings", "the daemon uses another database than this "
                                             f"command ({daemon.database}): run the CLI with "
                                             "the daemon's settings (docs: Deployment)"))
        if daemon.rules is None and daemon.unloaded_action == "deny":
            out.append((CRITICAL, "logins", "logins are being refused (rules not loaded; "
                                            "rules_unloaded_action = deny)"))
        if age is None or age > RULES_MAX_AGE:
            shown = "never loaded" if age is None else f"last confirmed {age:.0f} s ago"
            out.append((WARNING, "rules", shown))
        else:
            out.append((OK, "rules", f"{daemon.rules} rules, version "
                                     f"{daemon.config_version}, confirmed {age:.0f} s ago"))
        out += status_checks(daemon)     # rows the loader left out, load errors
        if daemon.notify_failed:
            out.append((WARNING, "notify", f"{daemon.notify_failed} new-location "
                                           "notifications failed or were dropped (see log)"))
    out += _geoip(settings, daemon)
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


def _geoip(settings, daemon) -> list[tuple[int, str, str]]:
    """The GeoIP databases: what the daemon loaded, or whether the files open."""
    if not (settings.geoip_country_db or settings.geoip_asn_db):
        return []
    if daemon is not None and daemon.geoip:
        return [(OK, "geoip", f"loaded: {daemon.geoip}; {daemon.new_locations} new "
                              "locations since start")]
    try:
        geoip = GeoIP.from_settings(settings)
    except GeoIPError as exc:
        return [(CRITICAL, "geoip", f"{exc.reason} ({exc.key})")]
    return [(OK, "geoip", f"readable: {geoip.describe() if geoip else ''}")]


def _database(url: str) -> tuple[int, str, str]:
    """Reachable and at head? Looks only: never creates an SQLite file."""
    try:
        make_url(url).port
        path = _sqlite_file(url)
    except (ValueError, sa.exc.ArgumentError) as exc:
        return CRITICAL, "database", f"not a database URL: {exc}"
    if path is not None and not os.path.isfile(path):
        return CRITICAL, "database", f"no database at {path}: run `lastlogin db upgrade`"
    engine = make_engine(url, connect_timeout=3, read_only=True)
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


def _running(settings) -> DaemonStatus | None:
    try:
        directory = settings.runtime_dir()
    except ConfigError:             # no runtime directory: no daemon to ask
        return None
    return read_status(directory)
