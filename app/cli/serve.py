"""`lastlogin serve`."""

from __future__ import annotations

import os

from ..daemon import run
from ..logs import setup_logging
from ..sockets import SocketInUse
from .common import EXIT_CONFIG, Context, edge, fail, main_group, pass_ctx


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
    setup_logging(settings.log_level, settings.log_format, settings.secrets())
    try:
        run(settings, ctx.config_path)
    except (SocketInUse, PermissionError) as exc:
        fail(f"cannot listen: {exc}", EXIT_CONFIG)
