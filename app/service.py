"""One login: decide, plan, record -- and say what to send.

No sockets and no files here. The server reads the request and hands it in
with the client's fd (only for a next post-login hop, which takes it on);
the service returns an ``Answer``: the bytes for the client (alerts, or the
refusal line) and the reply line for Dovecot. The server writes them.

``explain`` is the decision and the plan without recording: the daemon
uses it for every login and ``lastlogin check`` prints it, so the two
cannot disagree.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from .config import Settings, redact_url
from .geoip import NOWHERE, GeoIP, Place
from .login import (ALLOWED, DENIED, LoginRecord, new_event_id, normalize_ip, parse_network,
                    stored_ip, text_form)
from .metrics import Metrics
from .nexthop import forward
from .db.store import previous_login
from .login import domain_of
from .overrides import Plan, alerts_for, plan
from .templates import uses_last_login
from .policy import ALLOW, DENY, Decision, login_decision
from .protocol import (DEFAULT_DENY_TEXT, TEMPFAIL_TEXT, LoginRequest, build_reply, deny_line,
                       tempfail_line)
from .recorder import Pending, Recorder, RecordError
from .snapshot import ConfigCache, Snapshot
from .status import DaemonStatus
from .sysgroups import GroupCache
from .templates import ExpansionRefused

__all__ = ["Answer", "Explanation", "LoginService", "Plan", "Steps", "explain", "locate"]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Answer:
    """What the server sends: bytes for the client, then the reply (and maybe
    an fd) for Dovecot -- or no reply, which Dovecot takes as a refusal."""

    record: LoginRecord | None          # None: it could not be recorded
    reply: bytes | None
    reply_fd: int | None = None
    reason: str = ""
    to_client: bytes = b""
    alerts: int = 0                     # alerts in to_client

    @property
    def allowed(self) -> bool:
        return self.reply is not None


@dataclass(frozen=True)
class Explanation:
    """The decision for one login and, when allowed, its plan."""

    decision: Decision
    plan: Plan | None = None
    applied: bool = True            # False: decided without rules loaded
    user: str = ""                  # the username as text (what was matched)
    place: Place = NOWHERE          # where the client is (GeoIP), as the rules saw it

    @property
    def client_text(self) -> str | None:
        """What a refused client is told (None: allowed)."""
        if self.decision.allowed:
            return None
        if self.decision.temporary:
            return TEMPFAIL_TEXT
        return self.decision.message or DEFAULT_DENY_TEXT


def explain(snap: Snapshot | None, protocol: str, req: LoginRequest, now: dt.datetime,
            default: str = ALLOW, unloaded: str = ALLOW,
            system_groups: tuple[str, ...] = (), place: Place = NOWHERE,
            last_login: tuple[str, str, str] | None = None,
            exempt: tuple = ()) -> Explanation:
    """Decide and plan one login, as the daemon does (and `check` shows). Pure.

    ``place``: the client's country and ASN, looked up by the caller
    (``locate``) from the full address.
    """
    user = text_form(req.username)[0]
    rules = snap.rules if snap is not None else None
    auto = snap.auto.with_exempt(exempt) if snap is not None else None
    decision = login_decision(rules, protocol, user, req.remote_ip, req.local_ip, now,
                              default, unloaded, place.country, place.asn, auto)
    if not decision.allowed:
        return Explanation(decision, None, rules is not None, user, place)
    overrides, alerts, delivered = ((snap.overrides, snap.alerts, snap.delivered)
                                    if snap is not None else (None, (), set()))
    try:
        planned = plan(overrides, alerts, delivered, protocol, req, user, now, system_groups,
                       last_login)
        return Explanation(decision, planned, rules is not None, user, place)
    except ExpansionRefused as exc:
        return Explanation(Decision(DENY, None, f"override: {exc}", temporary=True), None,
                           rules is not None, user, place)


def locate(geoip: GeoIP | None, remote_ip: bytes | str | None) -> Place:
    """Where the client is: looked up from the full address (before store_ip)."""
    if geoip is None:
        return NOWHERE
    return geoip.lookup(normalize_ip(remote_ip))


@dataclass
class Steps:
    """Settings of the login steps: fallbacks, system groups, next hop, host name."""

    default_action: str = ALLOW
    unloaded_action: str = ALLOW
    record_timeout: float = 2.0
    groups: GroupCache | None = None
    next_sockets: dict[str, str] = field(default_factory=dict)
    next_timeout: float = 20.0
    host_name: str | None = None        # stored with every login (login_events.host)
    database: str = ""                  # for status: where logins go (password hidden)
    geoip: GeoIP | None = None          # country/ASN databases; None: not configured
    store_ip: str = "full"              # full, truncated or none (before storing/spooling)
    exempt: tuple = ()                  # block_exempt_networks: no automatic block applies

    @classmethod
    def from_settings(cls, settings: Settings, geoip: GeoIP | None = None) -> "Steps":
        return cls(
            default_action=settings.default_action,
            unloaded_action=settings.rules_unloaded_action,
            record_timeout=settings.record_timeout,
            groups=GroupCache() if settings.acl_groups_from_system else None,
            next_sockets={p: settings.next_socket(p) for p in settings.protocols
                          if settings.next_socket(p)},
            next_timeout=settings.next_timeout, host_name=settings.host_name,
            database=redact_url(settings.effective_database_url), geoip=geoip,
            store_ip=settings.store_ip,
            exempt=tuple(parse_network(n) for n in settings.block_exempt_networks))


class LoginService:
    def __init__(self, recorder: Recorder, cache: ConfigCache, steps: Steps | None = None,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.recorder = recorder
        self.cache = cache
        self.steps = steps or Steps()
        self.clock = clock
        self.metrics: "Metrics | None" = None
        self.notifier = None                # notify.Notifier, for status

    def reconfigure(self, settings: Settings, geoip: GeoIP | None = None) -> None:
        """New settings (SIGHUP): the next login uses them."""
        self.steps = Steps.from_settings(settings, geoip)

    def status(self) -> DaemonStatus:
        """The service's part of what `lastlogin status` reads."""
        snap = self.cache.snapshot
        rec = self.recorder
        full = rec.spool_refusing
        return DaemonStatus(
            database_down=rec.down,
            config_version=snap.version if snap else None,
            rules=len(snap.rules) if snap else None,
            config_checked_age=self.cache.checked_age(),
            spool_bytes=rec.spool.size if rec.spool else 0,
            committed=rec.records, spooled=rec.spooled, dropped=rec.dropped,
            quarantined=rec.spool.quarantine.count() if rec.spool else rec.quarantined,
            database_errors=rec.db_errors,
            refusing=full if full and rec.spool_full_action == "refuse" else None,
            unrecorded=full if full and rec.spool_full_action != "refuse" else None,
            config_skipped=[list(x) for x in self.cache.skipped],
            config_load_error=self.cache.load_error,
            database=self.steps.database, unloaded_action=self.steps.unloaded_action,
            new_locations=rec.new_locations,
            notify_failed=(self.notifier.failed + self.notifier.dropped
                           if self.notifier else 0),
            geoip=self.steps.geoip.describe() if self.steps.geoip else "")

    async def login(self, protocol: str, req: LoginRequest, client_fd: int) -> Answer:
        """Decide, plan and record one login; what to send comes back."""
        try:
            return await self._login(protocol, req, client_fd)
        except RecordError as exc:
            return self._unrecorded(protocol, exc)

    def login_now(self, protocol: str, req: LoginRequest,
                  done: Callable[[Answer | None, BaseException | None], None]
                  ) -> Pending | None:
        """The common login without a coroutine: no system groups to look up,
        no previous login to read for an alert, no next hop. Decided and
        planned now, handed to the recorder; ``done(answer, exc)`` is called
        on the loop once the record is durable (what ``login`` would return
        or raise). None: this login needs ``login`` (nothing was done)."""
        started = time.perf_counter()
        now = self.clock()
        steps = self.steps
        snap = self.cache.snapshot
        if (steps.groups is not None or protocol in steps.next_sockets
                or self._wants_previous(snap, protocol, req, now)):
            return None
        ex = self._explain(snap, protocol, req, now, (), None, started)
        record, answer = self._verdict(protocol, req, now, ex)
        began = time.perf_counter()

        def recorded(_outcome: str | None, exc: BaseException | None) -> None:
            # done is called exactly once, also when a step before it raises:
            # the connection then logs, closes and frees its slot.
            result: tuple[Answer | None, BaseException | None]
            try:
                self._observe_record(began)
                if exc is None:
                    self._delivered(ex, answer)
                    result = (answer, None)
                elif isinstance(exc, RecordError):
                    result = (self._unrecorded(protocol, exc), None)
                else:
                    result = (None, exc)
            except Exception as err:  # noqa: BLE001
                result = (None, err)
            done(*result)

        return self.recorder.submit(record, steps.record_timeout, recorded)

    async def _login(self, protocol: str, req: LoginRequest, client_fd: int) -> Answer:
        started = time.perf_counter()
        now = self.clock()
        steps = self.steps
        groups: tuple[str, ...] = ()
        if steps.groups is not None:
            groups = tuple(await steps.groups.groups(text_form(req.username)[0]))
        snap = self.cache.snapshot
        last = await self._previous_login(snap, protocol, req, now)
        ex = self._explain(snap, protocol, req, now, groups, last, started)
        hop = steps.next_sockets.get(protocol)
        if ex.plan is not None and hop:
            return await self._forwarded(protocol, req, client_fd, now, ex, hop)
        record, answer = self._verdict(protocol, req, now, ex)
        await self._commit(record)
        self._delivered(ex, answer)
        return answer

    def _explain(self, snap: Snapshot | None, protocol: str, req: LoginRequest,
                 now: dt.datetime, groups: tuple[str, ...],
                 last: tuple[str, str, str] | None, started: float) -> Explanation:
        steps = self.steps
        ex = explain(snap, protocol, req, now, steps.default_action, steps.unloaded_action,
                     groups, locate(steps.geoip, req.remote_ip), last, steps.exempt)
        if self.metrics:
            self.metrics.decision_seconds.observe(time.perf_counter() - started)
        return ex

    def _verdict(self, protocol: str, req: LoginRequest, now: dt.datetime,
                 ex: Explanation) -> tuple[LoginRecord, Answer]:
        """The record to store and the answer to give once it is stored
        (a login not handed on to a next hop)."""
        decision = ex.decision
        if ex.plan is None:
            record = self._record_of(protocol, req, DENIED, now, ex, message=ex.client_text)
            line = (tempfail_line(protocol) if decision.temporary
                    else deny_line(protocol, ex.client_text or DEFAULT_DENY_TEXT))
            return record, Answer(record, None, reason=decision.reason, to_client=line)
        record = self._record_of(protocol, req, ALLOWED, now, ex, tuple(ex.plan.alerts))
        return record, Answer(record, build_reply(req.username, ex.plan.fields), None,
                              decision.reason, ex.plan.alert_bytes, ex.plan.shown)

    def _delivered(self, ex: Explanation, answer: Answer) -> None:
        """The record is durable: its show-once alerts count as shown."""
        if ex.plan is not None and answer.reply is not None:
            self._mark_shown(ex.plan.alerts, ex.user)

    @staticmethod
    def _unrecorded(protocol: str, exc: RecordError) -> Answer:
        return Answer(None, None, reason=f"not recorded: {exc}",
                      to_client=tempfail_line(protocol))

    async def _forwarded(self, protocol: str, req: LoginRequest, client_fd: int,
                         now: dt.datetime, ex: Explanation, hop: str) -> Answer:
        """An allowed login handed on to the next post-login socket first."""
        assert ex.plan is not None
        got = await forward(hop, req, ex.plan.fields, client_fd, self.steps.next_timeout)
        if got.line is None:
            record = self._record_of(protocol, req, DENIED, now, ex, by_rule=False)
            await self._commit(record)
            return Answer(record, None, reason=got.reason,
                          to_client=tempfail_line(protocol) if got.tempfail else b"")
        record = self._record_of(protocol, req, ALLOWED, now, ex, tuple(ex.plan.alerts))
        try:
            await self._commit(record)
        except RecordError:
            if got.fd is not None:
                os.close(got.fd)
            raise
        self._mark_shown(ex.plan.alerts, ex.user)
        return Answer(record, got.line, got.fd, ex.decision.reason, ex.plan.alert_bytes,
                      ex.plan.shown)

    def _wants_previous(self, snap: Snapshot | None, protocol: str, req: LoginRequest,
                        now: dt.datetime) -> bool:
        """Does an alert this login shows use %{last_login_*}?"""
        if snap is None or protocol != "imap" or not snap.alerts:
            return False
        user = text_form(req.username)[0]
        shown = alerts_for(snap.alerts, snap.delivered, user, domain_of(user), now)
        return any(uses_last_login(a.message) for a in shown)

    async def _previous_login(self, snap: Snapshot | None, protocol: str, req: LoginRequest,
                              now: dt.datetime) -> tuple[str, str, str] | None:
        """The previous login, read only when an alert this login shows uses
        %{last_login_*}; ('', '', '') when it cannot be read in time."""
        if not self._wants_previous(snap, protocol, req, now):
            return None
        try:
            async with asyncio.timeout(min(1.0, self.steps.record_timeout)):
                found = await asyncio.to_thread(self._read_previous, req.username)
        except Exception:  # noqa: BLE001 - an alert without it, never a failed login
            return ("", "", "")
        return found or ("", "", "")

    def _read_previous(self, username: bytes) -> tuple[str, str, str] | None:
        with self.recorder.engine.connect() as conn:
            return previous_login(conn, username)

    def _record_of(self, protocol: str, req: LoginRequest, outcome: str, now: dt.datetime,
                   ex: Explanation, alerts_shown: tuple[int, ...] = (),
                   message: str | None = None, by_rule: bool = True) -> LoginRecord:
        rule = ex.decision.rule if by_rule else None
        return LoginRecord(
            event_id=new_event_id(), occurred_at=now, username=req.username,
            protocol=protocol,
            remote_ip=stored_ip(normalize_ip(req.remote_ip), self.steps.store_ip),
            local_ip=normalize_ip(req.local_ip), outcome=outcome,
            rule_id=rule.id if rule is not None else None,
            auth_mech=req.auth_mech, master_user=req.master_user, auth_user=req.auth_user,
            alerts_shown=alerts_shown, message=message, policy_applied=ex.applied,
            host=self.steps.host_name, country=ex.place.country, asn=ex.place.asn)

    def _mark_shown(self, alert_ids: list[int], user: str) -> None:
        snap = self.cache.snapshot
        if snap is not None and alert_ids:
            snap.delivered.update((a, user) for a in alert_ids)

    async def _commit(self, record: LoginRecord) -> str:
        """Durable before the answer (committed, spooled or set aside), or RecordError."""
        started = time.perf_counter()
        try:
            return await self.recorder.record(record, self.steps.record_timeout)
        finally:
            self._observe_record(started)

    def _observe_record(self, started: float) -> None:
        if self.metrics:
            self.metrics.record_seconds.observe(time.perf_counter() - started)
