"""The root group, shared options and the error edge."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import click
import sqlalchemy as sa

from .. import __version__
from ..config import ConfigError, Settings, load_settings
from ..db import make_engine
from ..db.migrate import SchemaNotCurrent, ensure_at_head
from ..errors import InvalidInput, NotFound

EXIT_PROBLEM = 1        # a check said no, or the thing asked for does not exist
EXIT_CONFIG = 2         # bad configuration or usage
EXIT_SCHEMA = 3         # the database is not at the newest migration
EXIT_DATABASE = 4       # the database could not be reached or said no


class Context:
    """Settings are loaded once, on first use, and reused by the command."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    def engine(self, check_schema: bool = True) -> sa.Engine:
        engine = make_engine(self.settings.effective_database_url,
                             file_group=self.settings.database_group or None)
        if check_schema:
            ensure_at_head(engine)
        return engine

    def begin(self):
        """A transaction on a schema-checked database (context manager)."""
        return self.engine().begin()


def fail(message: str, code: int) -> None:
    from .output import safe_text       # the message may quote input: no ESC/CR/LF
    click.echo(f"lastlogin: {safe_text(message)}", err=True)
    raise SystemExit(code)


def edge(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn domain errors into one line on stderr and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            fail(f"configuration error: {exc.key}: {exc.reason}", EXIT_CONFIG)
        except InvalidInput as exc:
            fail(f"invalid {exc.field}: {exc.reason}", EXIT_CONFIG)
        except NotFound as exc:
            fail(str(exc), EXIT_PROBLEM)
        except SchemaNotCurrent as exc:
            fail(str(exc), EXIT_SCHEMA)
        except sa.exc.OperationalError as exc:
            first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            fail(f"database error: {first}", EXIT_DATABASE)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lastlogin")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              envvar="LASTLOGIN_CONFIG",
              help="TOML settings file [default: /etc/lastlogin/lastlogin.toml if it exists].")
@click.pass_context
def main_group(ctx: click.Context, config_path: str | None) -> None:
    """lastlogin: record, police and adjust every Dovecot login.

    A native post-login daemon for Dovecot 2.3 and 2.4, with its database
    migrations, management and reporting commands.
    """
    os.umask(0o077)     # every file lastlogin creates is private unless it says otherwise
    ctx.obj = Context(config_path)


pass_ctx = click.make_pass_decorator(Context)
