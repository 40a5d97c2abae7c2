"""`lastlogin serve`."""

from __future__ import annotations

import os

import click

from .. import __version__
from ..config import redact_url
from ..logs import setup_logging
from ..sockets import SocketInUse
from .common import EXIT_CONFIG, CliError, Context, edge, fail, main_group, pass_ctx


def start_line(settings) -> str:
    """What is starting, where, in one readable line (the password hidden)."""
    url = redact_url(settings.effective_database_url)   # user:***@, and ?password=***
    sockets = ", ".join(settings.socket_path(p) for p in settings.protocols)
    return f"lastlogin {__version__}: serving {sockets}; database {url}"


@main_group.command()
@pass_ctx
@edge
def serve(ctx: Context) -> None:
    """Run the post-login daemon in the foreground (logs on stderr).

    Listens on one socket per protocol; point Dovecot's `executable = imap
    <socket>` at them. SIGTERM/SIGINT drain and stop, SIGHUP reloads.
    """
    os.umask(0o077)                 # also set for every command; the daemon relies on it
    settings = ctx.settings
    ctx.checked_url()                       # a malformed URL is one line, before anything
    setup_logging(settings.log_level, settings.log_format, settings.secrets())
    click.echo(start_line(settings))        # stdout: stderr is for the log and errors
    # Imported here: the daemon's modules (asyncio servers, the recorder, the
    # policy endpoint) cost every other command ~0.15 s of start-up otherwise.
    from ..daemon import run
    try:
        run(settings, ctx.config_path)
    except SocketInUse as exc:
        fail(f"cannot listen: {exc}", EXIT_CONFIG)
    except OSError as exc:
        what = exc.strerror or str(exc) or type(exc).__name__
        shown = f"{what}: {exc.filename}" if exc.filename else what
        raise CliError(f"cannot start: {shown}", setting_of(settings, exc.filename),
                       EXIT_CONFIG) from None


def setting_of(settings, path: str | None) -> str:
    """The setting a failing path came from (sockets when none is named: AF_UNIX limits)."""
    if not path:
        return "socket_dir"
    path = str(path).rstrip("/")
    bases = {"spool_dir": settings.effective_spool_dir, "socket_dir": settings.socket_dir,
             "data_dir": settings.data_dir}
    for name, base in bases.items():            # the path is the directory or inside it
        if path == base.rstrip("/") or path.startswith(base.rstrip("/") + "/"):
            return name
    for name in ("data_dir", "socket_dir", "spool_dir"):    # a parent that is missing
        if bases[name].startswith(path + "/"):
            return name
    return "socket_dir"
