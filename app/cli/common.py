"""The root group, shared options and the one error path of the CLI.

Every expected failure ends as one line on stderr,
``lastlogin: <what> (<setting or argument>)``, and an exit status from
EXIT_CODES; a Python traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import functools
import gzip
import os
import sys
import zlib
from typing import Any, Callable, NoReturn

import click
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from .. import __version__
from ..config import ConfigError, Settings, load_settings
from ..db import make_engine
from ..db.migrate import BadRevision, SchemaNotCurrent, ensure_at_head
from ..errors import InvalidInput, NotFound

EXIT_OK = 0
EXIT_PROBLEM = 1        # a check said no, a report is empty, the thing asked for does not exist
EXIT_USAGE = 2          # bad usage, configuration, argument or input file
EXIT_CONFIG = EXIT_USAGE
EXIT_SCHEMA = 3         # the database is not at this lastlogin's revision (or has no schema)
EXIT_DATABASE = 4       # the database could not be reached or failed
EXIT_INTERNAL = 5       # a bug: an error nobody expected (--debug shows the traceback)

# The one table; README.md's "Exit statuses" section says the same.
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_PROBLEM: "a check found a problem, a report has no rows, or the rule/alert "
                  "asked for does not exist",
    EXIT_USAGE: "usage, configuration, argument or input-file error",
    EXIT_SCHEMA: "schema state: the database is behind, newer than this lastlogin, or empty",
    EXIT_DATABASE: "database unreachable or failing",
    EXIT_INTERNAL: "unexpected error (a bug; --debug shows the traceback)",
}


class CliError(Exception):
    """An expected failure: one line and an exit status."""

    def __init__(self, what: str, where: str | None, code: int) -> None:
        super().__init__(what)
        self.what = what
        self.where = where
        self.code = code

    def line(self) -> str:
        return f"{self.what} ({self.where})" if self.where else self.what


class NoDatabase(CliError):
    """A read-only command found no database file (and will not make one)."""

    def __init__(self, path: str, setting: str) -> None:
        super().__init__(f"no database at {path}: run `lastlogin db upgrade` first",
                         setting, EXIT_SCHEMA)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


class Context:
    """Settings are loaded once, on first use, and reused by the command."""

    def __init__(self, config_path: str | None, debug: bool = False) -> None:
        self.config_path = config_path
        self.debug = debug
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    @property
    def url_setting(self) -> str:
        """The setting that decides the database: database_url, or data_dir."""
        return "database_url" if self.settings.database_url else "data_dir"

    def sqlite_path(self, url: str | None = None) -> str | None:
        parsed = make_url(url or self.checked_url())
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return None
        return os.path.abspath(parsed.database)

    def checked_url(self, url: str | None = None, setting: str | None = None) -> str:
        """``url`` (by default the database's) if it parses; else one line naming it."""
        url = url or self.settings.effective_database_url
        try:
            make_url(url).port      # a non-numeric port fails here, not deep inside
        except (ValueError, sa.exc.ArgumentError) as exc:
            raise CliError(f"not a database URL: {_first_line(exc)}",
                           setting or self.url_setting, EXIT_USAGE) from None
        return url

    def database_exists(self) -> bool:
        path = self.sqlite_path()
        return path is None or os.path.isfile(path)

    def engine(self, check_schema: bool = True, create: bool = False, *,
               reports: bool = False, read_only: bool = False) -> sa.Engine:
        """The database; an SQLite file is made only when ``create`` (db upgrade).

        ``reports``: where reports read (report_database_url when set);
        ``read_only``: an engine that cannot write (make_engine's)."""
        setting, url = self.url_setting, None
        if reports and self.settings.report_database_url:
            setting, url = "report_database_url", self.settings.report_database_url
        url = self.checked_url(url, setting)
        path = self.sqlite_path(url)
        if path is not None and not create and not os.path.isfile(path):
            raise NoDatabase(path, setting)
        try:
            engine = make_engine(url, file_group=self.settings.database_group or None,
                                 read_only=read_only)
        except OSError as exc:
            raise CliError(f"cannot make the database's directory: "
                           f"{exc.strerror or exc}: {exc.filename or path}",
                           setting, EXIT_USAGE) from None
        if check_schema:
            ensure_at_head(engine)
        return engine

    def begin(self):
        """A transaction on a schema-checked database (context manager)."""
        return self.engine().begin()


def fail(message: str, code: int) -> NoReturn:
    from .output import safe_text       # the message may quote input: no ESC/CR/LF
    click.echo(f"lastlogin: {safe_text(message)}", err=True)
    raise SystemExit(code)


# The library names what is wrong by setting, column or value; the command
# line calls them by its options and arguments. The one translation:
FLAG_OF = {
    "action": "ACTION", "protocol": "--protocol", "remote_network": "--network",
    "local_network": "--local-network", "username": "--user", "user": "--user",
    "domain": "--domain", "valid_from": "--from", "valid_until": "--until",
    "priority": "--priority", "message": "--message", "comment": "--comment",
    "everyone": "--everyone", "key": "KEY", "value": "VALUE", "alert": "MESSAGE",
    "table": "--table", "user_column": "--user-column", "time_column": "--time-column",
    "precision": "--precision", "countries": "--country", "asns": "--asn",
}


def flag_of(field: str) -> str:
    return FLAG_OF.get(field, field)


def classify(exc: BaseException) -> tuple[str, int]:
    """The one line (without the `lastlogin: ` prefix) and the exit status."""
    if isinstance(exc, CliError):
        return exc.line(), exc.code
    if isinstance(exc, ConfigError):
        return f"{exc.reason} ({exc.key})", EXIT_CONFIG
    if isinstance(exc, InvalidInput):
        return f"{exc.reason} ({flag_of(exc.field)})", EXIT_USAGE
    if isinstance(exc, NotFound):
        return str(exc), EXIT_PROBLEM
    if isinstance(exc, BadRevision):
        return f"{exc} (REVISION)", EXIT_USAGE
    if isinstance(exc, SchemaNotCurrent):
        return str(exc), EXIT_SCHEMA
    if isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError)):
        orig = exc.orig if exc.orig is not None else exc
        return f"the database refused a value: {_first_line(orig)}", EXIT_USAGE
    if isinstance(exc, sa.exc.DBAPIError):
        orig = exc.orig if exc.orig is not None else exc
        return f"database error: {_first_line(orig)} (database_url)", EXIT_DATABASE
    if isinstance(exc, sa.exc.SQLAlchemyError):
        return f"database error: {_first_line(exc)} (database_url)", EXIT_DATABASE
    if isinstance(exc, OverflowError):
        return f"a number is too large: {_first_line(exc)}", EXIT_USAGE
    if isinstance(exc, (EOFError, gzip.BadGzipFile, zlib.error)):
        return f"damaged input file: {_first_line(exc) or type(exc).__name__}", EXIT_USAGE
    if isinstance(exc, OSError):
        what = exc.strerror or _first_line(exc) or type(exc).__name__
        where = exc.filename
        return (f"{what} ({where})" if where else what), EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    return (f"unexpected error: {type(exc).__name__}: {_first_line(exc)} "
            "(run with --debug for the traceback)"), EXIT_INTERNAL


def _debugging() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if isinstance(ctx.obj, Context):
            return ctx.obj.debug
        ctx = ctx.parent
    return "--debug" in sys.argv[1:]


def handle(exc: BaseException) -> NoReturn:
    """Print the one line and exit; with --debug, let the traceback through."""
    if _debugging():
        raise exc
    message, code = classify(exc)
    fail(message, code)


_PASS_THROUGH = (SystemExit, click.exceptions.Exit, click.ClickException, click.Abort)


def edge(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors into one line on stderr and an exit status (see classify)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except BaseException as exc:  # noqa: BLE001 -- the one error path
            handle(exc)
    return wrapper


def _set_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        obj = ctx.find_object(Context)
        obj.config_path, obj._settings = value, None


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(Context).debug = True


def accept_global_options(group: click.Group) -> None:
    """--config and --debug on every subcommand too ("anywhere on the command
    line"), parsed by click in their place: a pass over argv before click
    would take the value of `--comment --debug` for the flag."""
    for cmd in group.commands.values():
        cmd.params.append(click.Option(["--config"], type=click.Path(dir_okay=False),
                                       expose_value=False, hidden=True, is_eager=True,
                                       callback=_set_config))
        cmd.params.append(click.Option(["--debug"], is_flag=True, expose_value=False,
                                       hidden=True, is_eager=True, callback=_set_debug))
        if isinstance(cmd, click.Group):
            accept_global_options(cmd)


class MainGroup(click.Group):
    """The root group: global options anywhere, and the one error path."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except BaseException as exc:  # noqa: BLE001 -- the one error path
            handle(exc)


@click.group(cls=MainGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lastlogin")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              envvar="LASTLOGIN_CONFIG",
              help="TOML settings file [default: /etc/lastlogin/lastlogin.toml if it exists]. "
                   "May be given anywhere on the command line.")
@click.option("--debug", is_flag=True,
              help="Show a Python traceback instead of the one-line error.")
@click.pass_context
def main_group(ctx: click.Context, config_path: str | None, debug: bool) -> None:
    """lastlogin: record, police and adjust every Dovecot login.

    A native post-login daemon for Dovecot 2.3 and 2.4, with its database
    migrations, management and reporting commands.

    Exit status: 0 success; 1 a check found a problem, a report has no rows
    or the thing asked for does not exist; 2 usage, configuration or input
    error; 3 schema state (behind, newer or no database); 4 database
    unreachable; 5 unexpected error (--debug shows the traceback).
    """
    os.umask(0o077)     # every file lastlogin creates is private unless it says otherwise
    ctx.obj = Context(config_path, debug)


pass_ctx = click.make_pass_decorator(Context)


# Ids and counts the database stores as 32-bit integers: larger is an error
# of the argument, not a crash of the database driver.
ID = click.IntRange(1, 2**31 - 1)
INT32 = click.IntRange(-(2**31), 2**31 - 1)


def utc_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--utc: type and show times in UTC instead of the local zone (the one time rule)."""
    return click.option("--utc", is_flag=True,
                        help="Times typed without a zone and times shown are UTC "
                             "(default: the local zone).")(fn)
