"""`lastlogin override ...` and `lastlogin alert ...`."""

from __future__ import annotations

import click

from ..db.overrides import (add_alert, list_alerts, list_overrides, remove_alert,
                            set_override, unset_override)
from ..errors import InvalidInput
from ..overrides import validate_scope, version_warning
from ..timeparse import DURATION_HELP, localize
from .common import ID, Context, edge, main_group, pass_ctx, utc_option
from .output import format_option, render
from .rule import table_safe, window


def scope_options(fn):
    fn = click.option("--global", "is_global", is_flag=True,
                      help="For every login (the default when no scope is given).")(fn)
    fn = click.option("--domain", help="For logins of one domain.")(fn)
    fn = click.option("--user", help="For one user (matched case-insensitively).")(fn)
    return fn


def scope_of(user: str | None, domain: str | None, is_global: bool,
             required: bool = True) -> tuple[str | None, str | None]:
    given = [s for s, v in (("user", user), ("domain", domain), ("global", is_global)) if v]
    if len(given) > 1:
        raise InvalidInput("scope", "give one of --user, --domain, --global")
    if not given:
        return ("global", None) if required else (None, None)
    scope = given[0]
    value = user if scope == "user" else domain if scope == "domain" else None
    return scope, (validate_scope(scope, value)[1] or None)


@main_group.group()
def override() -> None:
    """Userdb fields lastlogin adds to or changes in every matching login.

    A user's value beats the domain's, which beats the global one. Dovecot
    gets the complete field list with each key once; running daemons follow
    changes within a second.
    """


@override.command("set")
@click.argument("key")
@click.argument("value")
@scope_options
@click.option("--allow-uid-gid", "allow_ids", is_flag=True,
              help="Allow KEY uid or gid (changes who the session runs as; never 0).")
@pass_ctx
@edge
def override_set(ctx: Context, key: str, value: str, user, domain, is_global,
                 allow_ids: bool) -> None:
    """Set userdb field KEY to VALUE (e.g. mail, quota_rule, acl_groups).

    VALUE may use Dovecot's variables, expanded by lastlogin for each login:
    %u/%{user}, %n/%{username}, %d/%{domain}, %s/%{service}/%{protocol},
    %r/%{rip}/%{remote_ip}, %l/%{lip}/%{local_ip}, %% for a %.
    """
    scope, scope_value = scope_of(user, domain, is_global)
    with ctx.begin() as conn:
        set_override(conn, scope, scope_value, key, value, allow_ids)
    warning = version_warning(key, ctx.settings.dovecot_version)
    if warning:
        click.echo(f"lastlogin: warning: {key}: Dovecot {ctx.settings.dovecot_version} "
                   f"(dovecot_version): {warning}", err=True)
    click.echo(f"set {key} for {scope}{' ' + scope_value if scope_value else ''}")


@override.command("unset")
@click.argument("key")
@scope_options
@pass_ctx
@edge
def override_unset(ctx: Context, key: str, user, domain, is_global) -> None:
    """Remove an override; the login gets Dovecot's own value again."""
    scope, scope_value = scope_of(user, domain, is_global)
    with ctx.begin() as conn:
        unset_override(conn, scope, scope_value, key)
    click.echo(f"unset {key} for {scope}{' ' + scope_value if scope_value else ''}")


@override.command("list")
@scope_options
@format_option
@pass_ctx
@edge
def override_list(ctx: Context, user, domain, is_global, fmt: str) -> None:
    """List overrides, all of them or one scope's."""
    scope, scope_value = scope_of(user, domain, is_global, required=False)
    with ctx.begin() as conn:
        rows = [dict(r) for r in list_overrides(conn, scope, scope_value)]
    render(table_safe(rows, fmt), ("scope", "scope_value", "key", "value"), fmt)


@main_group.group()
def alert() -> None:
    """Messages shown to IMAP users at login (`* OK [ALERT] ...`).

    Never sent to POP3, submission or ManageSieve clients: those protocols
    have no way to show one without breaking the session.
    """


@alert.command("add")
@click.argument("message")
@scope_options
@click.option("--from", "start", metavar="TIME", help="Shown from TIME (ISO 8601, local zone).")
@click.option("--until", metavar="TIME", help="Shown until TIME.")
@click.option("--for", "duration", metavar="DURATION", help=f"Shown for DURATION ({DURATION_HELP}).")
@click.option("--once", is_flag=True, help="Show it to each user only once.")
@utc_option
@pass_ctx
@edge
def alert_add(ctx: Context, message: str, user, domain, is_global, start, until, duration,
              once: bool, utc: bool) -> None:
    """Add an alert with MESSAGE for every login, a domain's or a user's.

    MESSAGE may use the variables `override set` knows (%u, %n, %d, ...).
    """
    scope, scope_value = scope_of(user, domain, is_global)
    valid_from, valid_until = window(start, until, duration, utc)
    with ctx.begin() as conn:
        alert_id = add_alert(conn, scope, scope_value, message, valid_from, valid_until, once)
    click.echo(f"added alert {alert_id}")


@alert.command("list")
@format_option
@utc_option
@pass_ctx
@edge
def alert_list(ctx: Context, fmt: str, utc: bool) -> None:
    """List the alerts with their scope, window and show-once flag (local zone unless --utc)."""
    with ctx.begin() as conn:
        rows = [dict(r) for r in list_alerts(conn)]
    localize(rows, utc)
    render(table_safe(rows, fmt), ("id", "scope", "scope_value", "show_once", "valid_from",
                                   "valid_until",
                  "message"), fmt)


@alert.command("remove")
@click.argument("alert_id", type=ID)
@pass_ctx
@edge
def alert_remove(ctx: Context, alert_id: int) -> None:
    """Delete an alert (and the record of who has seen it)."""
    with ctx.begin() as conn:
        remove_alert(conn, alert_id)
    click.echo(f"removed alert {alert_id}")
