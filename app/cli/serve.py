"""`lastlogin serve`."""

from __future__ import annotations


import click
from sqlalchemy.engine import make_url

from .. import __version__
from ..daemon import run
from ..logs import setup_logging
from ..server import SocketInUse
from .common import EXIT_CONFIG, Context, edge, fail, main_group, pass_ctx


def start_line(settings) -> str:
    """What is starting, where, in one readable line (the password hidden)."""
    url = make_url(settings.effective_database_url).render_as_string(hide_password=True)
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
    settings = ctx.settings
    setup_logging(settings.log_level, settings.log_format)
    click.echo(start_line(settings))        # stdout: stderr is for the log and errors
    try:
        run(settings, ctx.config_path)
    except (SocketInUse, PermissionError) as exc:
        fail(f"cannot listen: {exc}", EXIT_CONFIG)
