"""`lastlogin rule ...` and `lastlogin check`: access rules from the command line."""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import os

import click

from ..db.rules import add_rule, get_rule, list_rules, remove_rule, rule_states, set_enabled
from ..errors import InvalidInput
from ..login import PROTOCOLS, normalize_user, parse_ip, parse_network, printable
from ..protocol import LoginRequest
from ..config import ConfigError
from ..geoip import GeoIP, GeoIPError
from ..service import explain, locate
from ..snapshot import load_snapshot, skipped_warnings
from ..sysgroups import GroupCache
from ..timeparse import DURATION_HELP, localize, parse_duration, parse_time
from .common import EXIT_PROBLEM, ID, INT32, Context, edge, main_group, pass_ctx, utc_option
from .output import cell, format_option, render, safe_text

LIST_COLUMNS = ("id", "action", "priority", "enabled", "state", "username", "domain",
                "remote_network", "local_network", "protocol", "countries", "asns",
                "valid_from", "valid_until", "message", "created_by")


def table_safe(rows: list[dict], fmt: str) -> list[dict]:
    """For a terminal table, control characters escaped (csv and json quote them)."""
    if fmt != "table":
        return rows
    return [{k: printable(v) for k, v in r.items()} for r in rows]


def operator() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def window(start: str | None, until: str | None, duration: str | None, utc: bool = False
           ) -> tuple[dt.datetime | None, dt.datetime | None]:
    if until and duration:
        raise InvalidInput("--for", "give --until or --for, not both")
    begin = parse_time(start, "--from", utc) if start else None
    end = parse_time(until, "--until", utc) if until else None
    if duration:
        end = (begin or dt.datetime.now(dt.timezone.utc)) + parse_duration(duration, "--for")
    return begin, end


@main_group.group()
def rule() -> None:
    """Manage access rules: who may log in, from where, over what, and when.

    The first enabled rule that matches, lowest priority number first,
    decides; when none matches, `default_action` (allow) applies. Changes
    reach a running daemon within a second. Usernames match
    case-insensitively and without surrounding spaces; domains are
    lowercased, without a leading @.
    """


@rule.command("add")
@click.argument("action", type=click.Choice(["allow", "deny"]))
@click.option("--user", help="Username to match (case-insensitive).")
@click.option("--domain", help="Domain (the part after the first @, as Dovecot's %d) to match.")
@click.option("--network", help="Client network to match, CIDR (IPv4 or IPv6).")
@click.option("--local-network", help="Server address/network to match, CIDR.")
@click.option("--protocol", help="imap, pop3, submission or managesieve.")
@click.option("--country", metavar="CC[,CC...]",
              help="Client countries to match (ISO 3166-1 codes, GeoIP; needs geoip_country_db).")
@click.option("--asn", metavar="N[,N...]",
              help="Client AS numbers to match (GeoIP; needs geoip_asn_db).")
@click.option("--from", "start", metavar="TIME", help="Active from TIME (ISO 8601; local zone unless --utc or an offset).")
@click.option("--until", metavar="TIME", help="Active until TIME.")
@click.option("--for", "duration", metavar="DURATION", help=f"Active for DURATION ({DURATION_HELP}).")
@click.option("--priority", type=INT32, default=100, show_default=True,
              help="Lower numbers are checked first.")
@click.option("--message", help="Text a refused client sees.")
@click.option("--comment", help="Why the rule exists (for the next admin).")
@click.option("--disabled", is_flag=True, help="Add it switched off.")
@click.option("--everyone", is_flag=True,
              help="Match every login (needed when no --user, --domain, --network, "
                   "--local-network or --protocol is given).")
@utc_option
@pass_ctx
@edge
def rule_add(ctx: Context, action, user, domain, network, local_network, protocol, country,
             asn, start, until, duration, priority, message, comment, disabled, everyone,
             utc) -> None:
    """Add a rule that allows or denies matching logins.

    A rule by place (--country, --asn) matches only logins whose place is
    known: "example.org only from DE and AT" is an allow rule with
    --domain example.org --country DE,AT before a deny rule for the domain.
    """
    valid_from, valid_until = window(start, until, duration, utc)
    place_needs_database(ctx, country, asn)
    with ctx.begin() as conn:
        try:
            rule_id = add_rule(
                conn, action=action, username=user, domain=domain, remote_network=network,
                local_network=local_network, protocol=protocol, valid_from=valid_from,
                valid_until=valid_until, priority=priority, message=message, comment=comment,
                enabled=not disabled, created_by=operator(), everyone=everyone,
                countries=country, asns=asn)
        except InvalidInput as exc:
            if exc.field == "everyone" and not everyone:
                raise InvalidInput("everyone", "a rule with no --user, --domain, --network, "
                                               "--local-network, --protocol, --country or "
                                               "--asn would match every login: give "
                                               "--everyone if that is meant") from None
            raise
    click.echo(f"added rule {rule_id}")


def open_geoip(settings) -> GeoIP | None:
    """The configured GeoIP databases (None: none); a bad file is a one-line error."""
    try:
        return GeoIP.from_settings(settings)
    except GeoIPError as exc:
        raise ConfigError(exc.key, exc.reason) from None


def place_needs_database(ctx: Context, country: str | None, asn: str | None) -> None:
    """A rule by place without the database to place logins would never match: refused."""
    s = ctx.settings
    if country is not None and not (s.geoip_country_db or s.geoip_asn_db):
        raise InvalidInput("--country", "no GeoIP database is configured (geoip_country_db): "
                                        "the rule could never match")
    if asn is not None and not s.geoip_asn_db:
        raise InvalidInput("--asn", "no GeoIP ASN database is configured (geoip_asn_db): "
                                    "the rule could never match")


@rule.command("list")
@format_option
@utc_option
@pass_ctx
@edge
def rule_list(ctx: Context, fmt: str, utc: bool) -> None:
    """List every rule in the order they are checked (times in the local zone unless --utc).

    `state` is what a running daemon makes of the row now: on, off, expired,
    scheduled, or skipped with the reason (a row written with SQL that the
    loader cannot use).
    """
    with ctx.begin() as conn:
        states = rule_states(conn)
        rows = [dict(r, state=states.get(r["id"], "")) for r in list_rules(conn)]
    localize(rows, utc)
    render(table_safe(rows, fmt), LIST_COLUMNS, fmt)


@rule.command("show")
@click.argument("rule_id", type=ID)
@format_option
@utc_option
@pass_ctx
@edge
def rule_show(ctx: Context, rule_id: int, fmt: str, utc: bool) -> None:
    """Show one rule with all its fields."""
    with ctx.begin() as conn:
        row = dict(get_rule(conn, rule_id))
    localize([row], utc)
    (row,) = table_safe([row], fmt)
    if fmt == "table":
        for key, value in row.items():
            click.echo(f"{key:15} {cell(value, fmt)}".rstrip())
    else:
        render([row], list(row), fmt)


def _simple(name: str, doc: str, fn):
    @rule.command(name, help=doc)
    @click.argument("rule_id", type=ID)
    @pass_ctx
    @edge
    def command(ctx: Context, rule_id: int) -> None:
        with ctx.begin() as conn:
            fn(conn, rule_id)
        click.echo(f"rule {rule_id}: {name}d" if name != "remove" else f"removed rule {rule_id}")
    return command


_simple("remove", "Delete a rule (its id stays in the login history).", remove_rule)
_simple("enable", "Switch a rule on again; running daemons follow within a second.", lambda c, i: set_enabled(c, i, True))
_simple("disable", "Switch a rule off without deleting it; daemons follow within a second.", lambda c, i: set_enabled(c, i, False))


@main_group.command()
@click.argument("username")
@click.argument("ip")
@click.option("--protocol", default="imap", show_default=True,
              type=click.Choice(PROTOCOLS))
@click.option("--local-ip", help="The server address the client connected to.")
@click.option("--at", "at", metavar="TIME", help="Decide as of TIME instead of now.")
@utc_option
@pass_ctx
@edge
def check(ctx: Context, username: str, ip: str, protocol: str, local_ip: str | None,
          at: str | None, utc: bool) -> None:
    """Dry run: what would happen to a login of USERNAME from IP, and why.

    Prints the decision and the rule that made it; for an allowed login also
    the userdb fields lastlogin would set and the alerts it would show.
    Exit status 0 when it would be allowed, 1 when it would be refused.
    The decision is made by the daemon's own code, on the same rules.
    """
    username = normalize_user(username)
    if not username:
        raise InvalidInput("USERNAME", "must not be empty")
    if parse_ip(ip) is None:
        raise InvalidInput("IP", f"not an IP address: {ip!r}")
    if local_ip and parse_ip(local_ip) is None:
        raise InvalidInput("--local-ip", f"not an IP address: {local_ip!r}")
    now = parse_time(at, "--at", utc) if at else dt.datetime.now(dt.timezone.utc)
    with ctx.begin() as conn:
        snap = load_snapshot(conn, min(now, dt.datetime.now(dt.timezone.utc)))
    for line in skipped_warnings(snap.skipped):
        click.echo(f"lastlogin: warning: {line}", err=True)
    s = ctx.settings
    req = LoginRequest((local_ip or "").encode(), ip.encode(), username.encode(), [])
    groups = tuple(asyncio.run(GroupCache().groups(username))) if s.acl_groups_from_system \
        else ()
    place = locate(open_geoip(s), ip)
    ex = explain(snap, protocol, req, now, s.default_action, s.rules_unloaded_action, groups,
                 place, exempt=tuple(parse_network(n) for n in s.block_exempt_networks))
    decision = ex.decision
    if s.geoip_country_db or s.geoip_asn_db:
        click.echo(f"country:  {place.country or 'unknown'}")
        click.echo(f"asn:      {place.asn if place.asn is not None else 'unknown'}")
    if decision.temporary and decision.reason.startswith("override:"):
        click.echo("decision: allow")
        click.echo("refused:  temporary failure: "
                   f"{safe_text(decision.reason[len('override: '):])}")
        raise SystemExit(EXIT_PROBLEM)
    click.echo(f"decision: {decision.action}")
    if decision.rule:
        r = decision.rule
        click.echo(f"rule:     {r.id} (priority {r.priority})")
    else:
        click.echo(f"rule:     none matched; default_action is {s.default_action}")
    if not decision.allowed:
        click.echo(f"message:  {safe_text(ex.client_text or '')}")
        raise SystemExit(EXIT_PROBLEM)
    plan = ex.plan
    assert plan is not None
    for f in plan.fields:
        click.echo(f"field:    {safe_text(f.decode('utf-8', 'backslashreplace'))}")
    if not plan.fields:
        click.echo("fields:   Dovecot's own, unchanged")
    for line in plan.alert_bytes.decode("utf-8", "replace").splitlines():
        click.echo(f"alert:    {safe_text(line)}")
