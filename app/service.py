"""One login: decide, adjust, alert, record, build the answer.

No sockets here: the server hands in a ``ClientChannel`` for writes to the
client and takes back an ``Answer``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .config import Settings
from .db.store import LoginRecord, normalize_ip, text_form
from .metrics import Metrics
from .nexthop import forward
from .overrides import alerts_for, merge_fields, union_list
from .policy import ALLOW, Decision, LoginFacts, decide, domain_of, login_decision
from .protocol import (DEFAULT_DENY_TEXT, LoginRequest, alert_line, build_reply,
                       deny_line, field_value, tempfail_line, TEMPFAIL_TEXT)
from .recorder import Recorder, RecordError
from .snapshot import ConfigCache, Snapshot
from .sysgroups import GroupCache
from .templates import ExpansionRefused, LoginVars, expand, expand_fields

__all__ = ["Answer", "Extras", "LoginService", "Policy", "RecordError"]


class ClientChannel(Protocol):
    """The client's connection, as far as the service may touch it."""

    fd: int

    async def write(self, data: bytes) -> None: ...


_random = random.Random()     # seeded from os.urandom when the module loads


def new_event_id() -> uuid.UUID:
    """A random (version 4) UUID without a system call per login.

    Event ids need to be unique, not secret: a PRNG seeded from the OS per
    process gives 122 random bits, as uuid4() does with os.urandom.
    """
    return uuid.UUID(int=_random.getrandbits(128), version=4)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Answer:
    """What the server sends Dovecot: a reply line (and maybe an fd), or nothing."""

    record: LoginRecord
    reply: bytes | None
    reply_fd: int | None = None
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.reply is not None


def make_record(protocol: str, req: LoginRequest, outcome: str,
                now: dt.datetime, rule_id: int | None = None,
                alerts_shown: tuple[int, ...] = (), message: str | None = None,
                policy_applied: bool = True, host: str | None = None) -> LoginRecord:
    return LoginRecord(
        event_id=new_event_id(),
        occurred_at=now,
        username=req.username,
        protocol=protocol,
        remote_ip=normalize_ip(req.remote_ip),
        local_ip=normalize_ip(req.local_ip),
        outcome=outcome,
        rule_id=rule_id,
        auth_mech=req.auth_mech,
        master_user=req.master_user,
        auth_user=req.auth_user,
        alerts_shown=alerts_shown,
        message=message,
        policy_applied=policy_applied,
        host=host,
    )


@dataclass
class Policy:
    """What the service decides with: the cache and the two fallbacks."""

    cache: ConfigCache
    default_action: str = ALLOW
    unloaded_action: str = ALLOW

    def decide(self, facts: LoginFacts) -> Decision:
        return decide(self.cache.rules, facts, self.default_action, self.unloaded_action)

    def decide_login(self, protocol: str, username: str, remote_ip: bytes | str | None,
                     local_ip: bytes | str | None, now: dt.datetime) -> Decision:
        """The one decision function, also what `lastlogin check` calls."""
        return login_decision(self.cache.rules, protocol, username, remote_ip, local_ip, now,
                              self.default_action, self.unloaded_action)


@dataclass
class Extras:
    """Optional steps: system groups into acl_groups, next post-login hop."""

    groups: GroupCache | None = None
    next_sockets: dict[str, str] = field(default_factory=dict)
    next_timeout: float = 20.0
    host_name: str | None = None        # stored with every login (login_events.host)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Extras":
        return cls(
            groups=GroupCache() if settings.acl_groups_from_system else None,
            next_sockets={p: settings.next_socket(p) for p in settings.protocols
                          if settings.next_socket(p)},
            next_timeout=settings.next_timeout, host_name=settings.host_name)


@dataclass(frozen=True)
class Plan:
    """What a login gets: the fields to send and the alerts to show."""

    fields: list[bytes]
    alerts: list[int]
    alert_bytes: bytes


async def plan_login(snap: Snapshot | None, groups: GroupCache | None, protocol: str,
                     req: LoginRequest, user: str, now: dt.datetime) -> Plan:
    """Fields and alerts for an allowed login (also what `lastlogin check` shows).

    Override values and alert texts are expanded for this login; an unsafe
    expansion raises ExpansionRefused (the login must be refused).
    """
    domain = domain_of(user)
    wanted = snap.overrides.for_login(user, domain) if snap else {}
    tvars = LoginVars.of(req.username, protocol, req.remote_ip, req.local_ip)
    wanted = expand_fields(wanted, tvars)
    if groups is not None:
        extra = await groups.groups(user)
        if extra:
            base = wanted.get("acl_groups")
            if base is None:
                current = field_value(req.fields, b"acl_groups")
                base = current.decode("utf-8", "replace") if current is not None else None
            wanted = {**wanted, "acl_groups": union_list(base, extra)}
    fields = merge_fields(req.fields, wanted)
    alerts = []
    if protocol == "imap" and snap is not None:
        # IMAP only: elsewhere an unsolicited line would break the session.
        alerts = alerts_for(snap.alerts, snap.delivered, user, domain, now)
    shown = [a.id for a in alerts if a.show_once]
    return Plan(fields, shown, b"".join(alert_line(expand(a.message, tvars)) for a in alerts))


class LoginService:
    def __init__(self, recorder: Recorder, policy: Policy, record_timeout: float,
                 extras: Extras | None = None,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.recorder = recorder
        self.policy = policy
        self.record_timeout = record_timeout
        self.extras = extras or Extras()
        self.clock = clock
        self.metrics: "Metrics | None" = None

    def status(self) -> dict[str, object]:
        """What `lastlogin status` reads (through the daemon's status file)."""
        snap = self.policy.cache.snapshot
        rec = self.recorder
        full = rec.spool_refusing
        return {
            "database_down": rec.down,
            "config_version": snap.version if snap else None,
            "rules": len(snap.rules) if snap else None,
            "config_checked_age": self.policy.cache.checked_age(),
            "spool_bytes": rec.spool.size if rec.spool else 0,
            "committed": rec.records, "spooled": rec.spooled, "dropped": rec.dropped,
            "quarantined": rec.spool.quarantine.count() if rec.spool else rec.quarantined,
            "database_errors": rec.db_errors,
            # while the spool cannot take records: refused, or allowed unrecorded
            "refusing": full if full and rec.spool_full_action == "refuse" else None,
            "unrecorded": full if full and rec.spool_full_action != "refuse" else None,
            # rows the loader left out: [table, id, reason] (`status` warns)
            "config_skipped": [list(x) for x in self.policy.cache.skipped],
            "config_load_error": self.policy.cache.load_error,
        }

    async def login(self, protocol: str, req: LoginRequest, client: ClientChannel) -> Answer:
        """Decide, plan and record one login; RecordError if it cannot be recorded
        (the client has then been told to try again later)."""
        try:
            return await self._login(protocol, req, client)
        except RecordError:
            with contextlib.suppress(OSError, TimeoutError):
                await client.write(tempfail_line(protocol))
            raise

    async def _login(self, protocol: str, req: LoginRequest,
                     client: ClientChannel) -> Answer:
        started = time.perf_counter()
        now = self.clock()
        user = text_form(req.username)[0]
        applied = self.policy.cache.rules is not None
        decision = self.policy.decide_login(protocol, user, req.remote_ip, req.local_ip, now)
        rule_id = decision.rule.id if decision.rule else None
        if not decision.allowed:
            if self.metrics:
                self.metrics.decision_seconds.observe(time.perf_counter() - started)
            return await self._refuse(protocol, req, now, rule_id, decision, client, applied)
        try:
            plan = await self.plan(protocol, req, user, now)
        except ExpansionRefused as exc:
            return await self._refuse(protocol, req, now, None,
                                      Decision("deny", None, f"override: {exc}", temporary=True),
                                      client, applied)
        if self.metrics:
            self.metrics.decision_seconds.observe(time.perf_counter() - started)
        if plan.alert_bytes:
            # Before the reply: imap sends its tagged OK as soon as it has it.
            await client.write(plan.alert_bytes)
            self._mark_shown(plan.alerts, user)
        reply, reply_fd, reason = build_reply(req.username, plan.fields), None, decision.reason
        hop = self.extras.next_sockets.get(protocol)
        if hop:
            got = await forward(hop, req, plan.fields, client.fd, self.extras.next_timeout)
            if got.line is None:
                record = make_record(protocol, req, "denied", now, None,
                                     host=self.extras.host_name)
                await self._commit(record)
                if got.tempfail:
                    await client.write(tempfail_line(protocol))
                return Answer(record, None, reason=got.reason)
            reply, reply_fd = got.line, got.fd
        record = make_record(protocol, req, "allowed", now, rule_id, tuple(plan.alerts),
                             policy_applied=applied, host=self.extras.host_name)
        try:
            await self._commit(record)
        except RecordError:
            if reply_fd is not None:
                os.close(reply_fd)
            raise
        return Answer(record, reply, reply_fd, reason)

    async def plan(self, protocol: str, req: LoginRequest, user: str,
                   now: dt.datetime) -> Plan:
        return await plan_login(self.policy.cache.snapshot, self.extras.groups,
                                protocol, req, user, now)

    def _mark_shown(self, alert_ids: list[int], user: str) -> None:
        snap = self.policy.cache.snapshot
        if snap is not None:
            snap.delivered.update((a, user) for a in alert_ids)

    async def _refuse(self, protocol: str, req: LoginRequest, now: dt.datetime,
                      rule_id: int | None, decision: Decision,
                      client: ClientChannel, applied: bool) -> Answer:
        # What the client is told, and what the history keeps of it.
        if decision.temporary:
            message, line = TEMPFAIL_TEXT, tempfail_line(protocol)
        else:
            message = decision.message or DEFAULT_DENY_TEXT
            line = deny_line(protocol, message)
        record = make_record(protocol, req, "denied", now, rule_id, message=message,
                             policy_applied=applied, host=self.extras.host_name)
        await self._commit(record)
        await client.write(line)
        return Answer(record, None, reason=decision.reason)

    async def _commit(self, record: LoginRecord) -> str:
        """Durable before the answer (committed, spooled or set aside), or RecordError."""
        started = time.perf_counter()
        try:
            return await self.recorder.record(record, self.record_timeout)
        finally:
            if self.metrics:
                self.metrics.record_seconds.observe(time.perf_counter() - started)
