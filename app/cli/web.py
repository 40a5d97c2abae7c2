"""`lastlogin web`: the read-only dashboard (docs/web.md)."""

from __future__ import annotations

import ipaddress
import socket

import click

from ..config import Settings
from ..logs import setup_logging
from .common import EXIT_CONFIG, CliError, Context, edge, main_group, pass_ctx


def listen_address(settings: Settings) -> tuple[str, int]:
    """(host, port) of web_listen; a non-loopback address needs web_token."""
    text = settings.web_listen
    if not text:
        raise CliError("must be host:port like 127.0.0.1:8470", "web_listen", EXIT_CONFIG)
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not is_loopback(host) and not settings.web_token:
        raise CliError(f"listening on {text}, which is not a loopback address, needs a "
                       "token: set web_token (LASTLOGIN_WEB_TOKEN)", "web_listen",
                       EXIT_CONFIG)
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False            # a name, or every address ("", 0.0.0.0, ::)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a busy port is one line, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                       "web_listen", EXIT_CONFIG) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@main_group.command()
@click.option("--utc", is_flag=True, help="Show times in UTC instead of the local zone.")
@pass_ctx
@edge
def web(ctx: Context, utc: bool) -> None:
    """Serve the read-only dashboard on web_listen (default 127.0.0.1:8470).

    Pages for the last 30 days, a user, inactive accounts and the rules,
    each with a JSON twin under /api/. With web_token set, every page asks
    for it (a login form, or `Authorization: Bearer TOKEN`); an address
    other than loopback is refused without one. Reads from
    report_database_url when set. SIGTERM/SIGINT stop it.
    """
    import datetime as dt

    import uvicorn

    from ..web.app import create_app

    settings = ctx.settings
    host, port = listen_address(settings)
    setup_logging(settings.log_level, settings.log_format, settings.secrets())
    # read-only: SQLite opened with mode=ro (never created), PostgreSQL sessions
    # read-only with a statement_timeout
    engine = ctx.engine(reports=True, read_only=True)
    sock = bind(host, port)
    tz = dt.timezone.utc if utc else None
    app = create_app(settings, engine, tz)
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    click.echo(f"lastlogin web: serving http://{shown}/ "
               f"({'token required' if settings.web_token else 'no token: loopback only'})")
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False,
                            server_header=False, proxy_headers=False, lifespan="off",
                            log_config=None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        engine.dispose()
