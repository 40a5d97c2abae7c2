"""Dovecot's authentication policy: the check before authentication, the
report after it, and automatic blocks. No sockets here (app/policyhttp.py).

* ``check`` answers ``command=allow`` from memory only: the rules snapshot
  (the same ``policy.login_decision`` the post-login step and `lastlogin
  check` use) plus automatic blocks not yet in that snapshot. It never waits
  on the database. A definite deny rejects (status -1, the rule's message if
  it has one, so the client sees Dovecot's normal authentication failure
  otherwise); anything else lets authentication go on: post-login still
  decides for a login that succeeds.
* ``report`` stores a failed authentication as a login_events row with
  outcome ``failed`` through the recorder (exactly once, spooled in an
  outage). A success stores nothing: the post-login step records it, and
  Dovecot's session id links the two.
* Automatic blocks (``block_after_failures`` > 0): failures are counted per
  remote address and per username in a sliding window of ``block_window``
  seconds, in memory; at the threshold an ordinary deny rule is added
  (``created_by = 'auto'``, ``valid_until = now + block_for``, a comment with
  the count and window) and applied in memory at once. It is held in memory
  until the snapshot has caught up with the version that holds it; from then
  on the snapshot alone decides, so `lastlogin rule remove` lifts it as soon
  as the snapshot reloads. Addresses in ``block_exempt_networks`` are never
  counted. Failures the policy server itself caused (``policy_reject``) are
  not counted: a block is not prolonged by the attempts it refuses.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import sqlalchemy as sa

from .attempts import Attempt, FailureWindows
from .config import Settings
from .db.rules import add_rule, config_version_of
from .errors import InvalidInput
from .login import (FAILED, IPAddr, LoginRecord, in_network, new_event_id, normalize_ip,
                    normalize_user, parse_ip, parse_network, user_key)
from .logs import show
from .policy import ALLOW, DENY, Rule, login_decision, order
from .recorder import Recorder, RecordError
from .snapshot import ConfigCache, Snapshot

log = logging.getLogger("lastlogin.policy")

AUTO = "auto"               # created_by of an automatic block
# Before ordinary rules (default priority 100), so an allow rule for a whole
# network does not shield one guessing address in it; an operator's rule
# below 50 still comes first. Exempt networks are block_exempt_networks.
AUTO_PRIORITY = 50


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class PolicySteps:
    default_action: str = ALLOW
    unloaded_action: str = ALLOW
    record_timeout: float = 2.0
    host_name: str | None = None
    block_after: int = 0
    window: float = 600.0
    block_for: float = 3600.0
    exempt: tuple = ()

    @classmethod
    def from_settings(cls, s: Settings) -> "PolicySteps":
        return cls(default_action=s.default_action, unloaded_action=s.rules_unloaded_action,
                   record_timeout=s.record_timeout, host_name=s.host_name,
                   block_after=s.block_after_failures, window=s.block_window,
                   block_for=s.block_for,
                   exempt=tuple(parse_network(n) for n in s.block_exempt_networks))


@dataclass
class _Pending:
    """An automatic block held in memory until the snapshot holds it."""

    rule: Rule
    version: int | None = None          # config_version that holds it, once stored
    seen: Snapshot | None = None        # the snapshot when it was stored


@dataclass(frozen=True)
class Verdict:
    status: int             # < 0 reject, 0 go on
    msg: str = ""
    reason: str = ""        # for the log line


class AuthPolicy:
    def __init__(self, recorder: Recorder, cache: ConfigCache, engine: sa.Engine | None,
                 steps: PolicySteps | None = None,
                 clock: Callable[[], dt.datetime] = utcnow,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.recorder = recorder
        self.cache = cache
        self.engine = engine
        self.steps = steps or PolicySteps()
        self.clock = clock
        self.monotonic = monotonic
        self.by_ip = FailureWindows(self.steps.window)
        self.by_user = FailureWindows(self.steps.window)
        self._pending: dict[str, _Pending] = {}
        self._merged: tuple[object, int, tuple[Rule, ...] | None] = (object(), -1, None)
        self._generation = 0            # bumped when _pending changes
        self._tasks: set[asyncio.Task] = set()
        self.checks = self.rejections = self.failures = self.unrecorded = 0
        self.blocks_added = 0
        self.metrics = None             # app.metrics.Metrics, when served

    def reconfigure(self, settings: Settings) -> None:
        self.steps = PolicySteps.from_settings(settings)
        self.by_ip.window = self.by_user.window = self.steps.window

    # --- the check before authentication ------------------------------------

    def rules(self, now: dt.datetime) -> tuple[Rule, ...] | None:
        """The snapshot's rules plus automatic blocks it does not hold yet."""
        snap = self.cache.snapshot
        if self._pending:
            self._prune(snap, now)
        if not self._pending:
            return None if snap is None else snap.rules
        cached_snap, generation, merged = self._merged
        if cached_snap is snap and generation == self._generation:
            return merged
        base = () if snap is None else snap.rules
        merged = order(base + tuple(p.rule for p in self._pending.values()))
        self._merged = (snap, self._generation, merged)
        return merged

    def _prune(self, snap: Snapshot | None, now: dt.datetime) -> None:
        for key, p in list(self._pending.items()):
            caught_up = snap is not None and p.version is not None and (
                (snap.version is not None and snap.version >= p.version)
                or (snap.version is None and snap is not p.seen))
            if caught_up or not p.rule.active_at(now):
                del self._pending[key]
                self._generation += 1

    def check(self, attempt: Attempt) -> Verdict:
        """``command=allow``: from memory, never the database."""
        now = self.clock()
        steps = self.steps
        decision = login_decision(self.rules(now), attempt.protocol or attempt.service,
                                  attempt.login, attempt.remote_ip, attempt.local_ip, now,
                                  steps.default_action, steps.unloaded_action)
        self.checks += 1
        rejected = not decision.allowed and not decision.temporary
        if self.metrics:
            self.metrics.policy_checks.labels("rejected" if rejected else "allowed").inc()
        if not rejected:
            return Verdict(0, "", decision.reason)
        self.rejections += 1
        return Verdict(-1, decision.message or "", decision.reason)

    # --- the report after authentication -------------------------------------

    async def report(self, attempt: Attempt) -> Verdict:
        """``command=report``: a failure is counted and stored as a failed row."""
        if attempt.success:
            return Verdict(0, "", "success (post-login records it)")
        self.failures += 1
        if self.metrics:
            self.metrics.policy_failures.inc()
        if not attempt.policy_reject:
            self._count(attempt)
        protocol = attempt.protocol
        if protocol is None:
            self.unrecorded += 1
            return Verdict(0, "", f"failure not stored: no stored protocol for service "
                                  f"{attempt.service[:40]!r}")
        now = self.clock()
        record = LoginRecord(
            event_id=new_event_id(), occurred_at=now, username=attempt.username_bytes,
            protocol=protocol, remote_ip=normalize_ip(attempt.remote_ip),
            local_ip=normalize_ip(attempt.local_ip), outcome=FAILED,
            message=attempt.failure_reason(), host=self.steps.host_name,
            session_id=attempt.session_id)
        try:
            how = await self.recorder.record(record, self.steps.record_timeout)
        except RecordError as exc:
            self.unrecorded += 1
            return Verdict(0, "", f"failure not stored: {exc}")
        return Verdict(0, "", f"failure {how}")

    # --- automatic blocks ---------------------------------------------------------

    def _count(self, attempt: Attempt) -> None:
        steps = self.steps
        if steps.block_after <= 0:
            return
        ip = parse_ip(attempt.remote_ip)
        if ip is not None and any(in_network(ip, net) for net in steps.exempt):
            return
        t = self.monotonic()
        if ip is not None:
            n = self.by_ip.add(str(ip), t)
            if n >= steps.block_after:
                self.by_ip.clear(str(ip))
                self._block(f"address {ip}", n, network=ip)
        user = normalize_user(attempt.login)
        if user:
            n = self.by_user.add(user_key(user), t)
            if n >= steps.block_after:
                self.by_user.clear(user_key(user))
                self._block(f"user {user}", n, username=user)

    def _already_blocked(self, key: str, rule: Rule, now: dt.datetime) -> bool:
        if key in self._pending:
            return True
        snap = self.cache.snapshot
        return snap is not None and any(
            r.created_by == AUTO and r.active_at(now) and r.action == DENY
            and r.remote_network == rule.remote_network and r.username == rule.username
            for r in snap.rules)

    def _block(self, key: str, count: int, network: IPAddr | None = None,
               username: str | None = None) -> None:
        now = self.clock()
        steps = self.steps
        net = None if network is None else parse_network(
            f"{network}/{network.max_prefixlen}")
        rule = Rule(id=-1, action=DENY, priority=AUTO_PRIORITY, username=username,
                    remote_network=net, valid_until=now + dt.timedelta(seconds=steps.block_for),
                    created_by=AUTO)
        if self._already_blocked(key, rule, now):
            return
        self._pending[key] = _Pending(rule)
        self._generation += 1
        self.blocks_added += 1
        comment = (f"{count} failed authentications within {_span(steps.window)} "
                   f"(block_after_failures={steps.block_after})")
        log.warning("event=auto_block %s=%s failures=%d window=%s until=%s", *_key_kv(key), count,
                    _span(steps.window), rule.valid_until.isoformat())
        if self.engine is None:
            return
        task = asyncio.get_running_loop().create_task(self._store(key, rule, username, comment,
                                                                  now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store(self, key: str, rule: Rule, username: str | None, comment: str,
                     now: dt.datetime) -> None:
        loop = asyncio.get_running_loop()
        try:
            rule_id, version = await loop.run_in_executor(
                None, self._insert, rule, username, comment, now)
        except (InvalidInput, sa.exc.SQLAlchemyError, OSError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.error("event=auto_block_not_stored %s=%s error=%s action=held_in_memory",
                      *_key_kv(key), show(reason[:200]))
            return
        pending = self._pending.get(key)
        if pending is not None and pending.rule is rule:
            self._pending[key] = _Pending(replace(rule, id=rule_id), version,
                                          self.cache.snapshot)
            self._generation += 1
        log.info("event=auto_block_stored %s=%s rule=%d", *_key_kv(key), rule_id)

    def _insert(self, rule: Rule, username: str | None, comment: str,
                now: dt.datetime) -> tuple[int, int | None]:
        assert self.engine is not None
        with self.engine.begin() as conn:
            rule_id = add_rule(
                conn, action=DENY, priority=AUTO_PRIORITY, username=username,
                remote_network=None if rule.remote_network is None else str(rule.remote_network),
                valid_until=rule.valid_until, comment=comment, created_by=AUTO, now=now)
            return rule_id, config_version_of(conn)

    def active_auto_blocks(self) -> int:
        """Automatic blocks in force now (stored or only in memory)."""
        now = self.clock()
        snap = self.cache.snapshot
        stored = {(r.remote_network, r.username) for r in (snap.rules if snap else ())
                  if r.created_by == AUTO and r.active_at(now)}
        held = {(p.rule.remote_network, p.rule.username) for p in self._pending.values()
                if p.rule.active_at(now)}
        return len(stored | held)

    async def drain(self, timeout: float) -> None:
        """Let automatic blocks being stored finish (shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


def _span(seconds: float) -> str:
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s % size == 0 and s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _key_kv(key: str) -> tuple[str, str]:
    kind, _, value = key.partition(" ")
    return ("remote_ip" if kind == "address" else "user"), show(value)
