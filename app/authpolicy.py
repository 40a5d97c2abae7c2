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
  outage), in a tracked task: the answer does not wait for the commit. A
  success stores nothing: the post-login step records it, and
  Dovecot's session id links the two.
* Automatic blocks (``block_after_failures`` > 0): failures are counted per
  remote address (IPv6: per /``block_ipv6_prefix``) and, with
  ``block_usernames``, per username (under a 16-byte digest) in a sliding
  window of ``block_window`` seconds, in memory; at the threshold an ordinary
  deny rule is added (``created_by = 'auto'``, ``valid_until = now +
  block_for``, a comment with the count and window) and applied in memory at
  once. It is held in memory (a dict by network or user_key, at most
  MAX_HELD) until the snapshot has caught up with the version that holds it;
  from then on the snapshot's ``auto`` dicts alone decide, so `lastlogin rule
  remove` lifts it as soon as the snapshot reloads. A block that cannot be
  stored is held until it expires and counted (``unstored_auto_blocks``).
  Addresses in ``block_exempt_networks`` are never counted, and no automatic
  block applies to them. A success clears the username's count. Failures the
  policy server itself caused (``policy_reject``) are not counted: a block is
  not prolonged by the attempts it refuses.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import sqlalchemy as sa

from .attempts import Attempt, FailureWindows
from .config import Settings
from .db.rules import add_auto_block, config_version_of
from .login import (FAILED, IPNet, LoginRecord, in_network, new_event_id, normalize_ip,
                    normalize_user, parse_ip, parse_network, user_key)
from .logs import show
from .policy import (ALLOW, AUTO, DENY, AutoBlocks, LoginFacts, Rule, addr_key, block_key,
                     login_decision, net_key)
from .recorder import Recorder
from .snapshot import ConfigCache, Snapshot

log = logging.getLogger("lastlogin.policy")

# Before ordinary rules (default priority 100), so an allow rule for a whole
# network does not shield one guessing address in it; an operator's rule
# below 50 still comes first. Exempt networks are block_exempt_networks.
AUTO_PRIORITY = 50
# Automatic blocks held in memory (not yet in the snapshot, or not storable)
# at most; past that the oldest is forgotten first.
MAX_HELD = 10_000


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
    block_usernames: bool = False
    v6_prefix: int = 64

    @classmethod
    def from_settings(cls, s: Settings) -> "PolicySteps":
        return cls(default_action=s.default_action, unloaded_action=s.rules_unloaded_action,
                   record_timeout=s.record_timeout, host_name=s.host_name,
                   block_after=s.block_after_failures, window=s.block_window,
                   block_for=s.block_for,
                   exempt=tuple(parse_network(n) for n in s.block_exempt_networks),
                   block_usernames=s.block_usernames, v6_prefix=s.block_ipv6_prefix)


@dataclass
class _Pending:
    """An automatic block held in memory until the snapshot holds it."""

    rule: Rule
    version: int | None = None          # config_version that holds it, once stored
    seen: Snapshot | None = None        # the snapshot when it was stored
    unstored: bool = False              # storing failed: held until it expires


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
        # Held blocks by key: a net_key (by address) or a user_key (by username).
        self._held: dict[object, _Pending] = {}
        self._tasks: set[asyncio.Task] = set()
        self.checks = self.rejections = self.failures = self.unrecorded = 0
        self.blocks_added = 0
        self.metrics = None             # app.metrics.Metrics, when served

    def reconfigure(self, settings: Settings) -> None:
        self.steps = PolicySteps.from_settings(settings)
        self.by_ip.window = self.by_user.window = self.steps.window

    # --- the check before authentication ------------------------------------

    def find(self, login: LoginFacts) -> Rule | None:
        """The automatic block for this login: held in memory or in the
        snapshot; none for an exempt address. O(1) in the number of blocks."""
        steps = self.steps
        ip = login.remote_ip
        if ip is not None and any(in_network(ip, n) for n in steps.exempt):
            return None
        snap = self.cache.snapshot
        if self._held:
            keys: list[object] = []
            if ip is not None:
                keys.append(addr_key(ip, 32 if ip.version == 4 else 128))
                if ip.version == 6:
                    keys.append(addr_key(ip, steps.v6_prefix))
            keys.append(login.user)
            now = login.now
            for key in keys:
                held = self._held.get(key)
                if held is None:
                    continue
                if self._caught_up(held, snap) or not held.rule.active_at(now):
                    del self._held[key]
                elif held.rule.matches(login):
                    return held.rule
        return None if snap is None else snap.auto.find(login)

    @staticmethod
    def _caught_up(p: _Pending, snap: Snapshot | None) -> bool:
        return snap is not None and p.version is not None and (
            (snap.version is not None and snap.version >= p.version)
            or (snap.version is None and snap is not p.seen))

    def check(self, attempt: Attempt) -> Verdict:
        """``command=allow``: from memory, never the database."""
        now = self.clock()
        steps = self.steps
        snap = self.cache.snapshot
        decision = login_decision(None if snap is None else snap.rules,
                                  attempt.protocol or attempt.service,
                                  attempt.login, attempt.remote_ip, attempt.local_ip, now,
                                  steps.default_action, steps.unloaded_action, auto=self)
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
        """``command=report``, as a coroutine (see ``report_nowait``)."""
        return self.report_nowait(attempt)

    def report_nowait(self, attempt: Attempt) -> Verdict:
        """``command=report``: a failure is counted, and handed to the recorder.

        The answer does not wait for the commit: the record is handed to the
        recorder (exactly once; it commits or spools) in a task of its own,
        tracked so that ``drain`` lets it finish at shutdown. Synchronous, so
        the HTTP endpoint answers it inside the callback that read it; needs
        a running event loop (for that task).
        """
        if attempt.success:
            # The user got the password right: failures counted against the
            # name (typos, an old password on a phone) no longer count.
            user = normalize_user(attempt.login)
            if user:
                self.by_user.clear(_digest(user_key(user)))
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
        self._track(self._record(record))
        return Verdict(0, "", "failure handed to the recorder")

    async def _record(self, record: LoginRecord) -> None:
        try:
            how = await self.recorder.record(record, self.steps.record_timeout)
        except Exception as exc:  # noqa: BLE001 - RecordError or worse: one log line
            self.unrecorded += 1
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.error("event=policy_failure_not_stored event_id=%s error=%s",
                      record.event_id, show(reason[:200]))
            return
        log.debug("event=policy_failure_stored event_id=%s how=%s", record.event_id, how)

    def _track(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            net = block_key(ip, steps.v6_prefix)
            n = self.by_ip.add(str(net), t)
            if n >= steps.block_after:
                self.by_ip.clear(str(net))
                shown = net.network_address if net.num_addresses == 1 else net
                self._block(net_key(net), f"address {shown}", n, network=net)
        if not steps.block_usernames:
            return
        user = normalize_user(attempt.login)
        if user:
            key = user_key(user)
            n = self.by_user.add(_digest(key), t)
            if n >= steps.block_after:
                self.by_user.clear(_digest(key))
                self._block(key, f"user {user}", n, username=user)

    def _already_blocked(self, key: object, now: dt.datetime) -> bool:
        held = self._held.get(key)
        if held is not None and held.rule.active_at(now):
            return True
        snap = self.cache.snapshot
        if snap is None:
            return False
        rule = (snap.auto.by_user if isinstance(key, str) else snap.auto.by_net).get(key)
        return rule is not None and rule.active_at(now)

    def _hold(self, key: object, pending: _Pending) -> None:
        self._held.pop(key, None)
        self._held[key] = pending               # newest last
        if len(self._held) > MAX_HELD:
            now, snap = self.clock(), self.cache.snapshot
            for k, p in list(self._held.items()):
                if self._caught_up(p, snap) or not p.rule.active_at(now):
                    del self._held[k]
            while len(self._held) > MAX_HELD:
                del self._held[next(iter(self._held))]

    def _block(self, key: object, what: str, count: int, network: IPNet | None = None,
               username: str | None = None) -> None:
        now = self.clock()
        steps = self.steps
        if self._already_blocked(key, now):
            return
        rule = Rule(id=-1, action=DENY, priority=AUTO_PRIORITY, username=username,
                    remote_network=network,
                    valid_until=now + dt.timedelta(seconds=steps.block_for), created_by=AUTO)
        self._hold(key, _Pending(rule))
        self.blocks_added += 1
        comment = (f"{count} failed authentications within {_span(steps.window)} "
                   f"(block_after_failures={steps.block_after})")
        log.warning("event=auto_block %s=%s failures=%d window=%s until=%s", *_key_kv(what),
                    count, _span(steps.window), rule.valid_until.isoformat())
        if self.engine is None:
            return
        self._track(self._store(key, what, rule, username, comment, now))

    async def _store(self, key: object, what: str, rule: Rule, username: str | None,
                     comment: str, now: dt.datetime) -> None:
        loop = asyncio.get_running_loop()
        try:
            rule_id, version = await loop.run_in_executor(
                None, self._insert, rule, username, comment, now)
        except Exception as exc:  # noqa: BLE001 - one log line; the block is held in memory
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.error("event=auto_block_not_stored %s=%s error=%s action=held_in_memory "
                      "until=%s", *_key_kv(what), show(reason[:200]),
                      rule.valid_until.isoformat() if rule.valid_until else "-")
            held = self._held.get(key)
            if held is not None and held.rule is rule:
                held.unstored = True
            return
        held = self._held.get(key)
        if held is not None and held.rule is rule:
            self._held[key] = _Pending(replace(rule, id=rule_id), version, self.cache.snapshot)
        log.info("event=auto_block_stored %s=%s rule=%d", *_key_kv(what), rule_id)

    def _insert(self, rule: Rule, username: str | None, comment: str,
                now: dt.datetime) -> tuple[int, int | None]:
        assert self.engine is not None
        with self.engine.begin() as conn:
            rule_id = add_auto_block(
                conn, priority=AUTO_PRIORITY, username=username,
                remote_network=None if rule.remote_network is None else str(rule.remote_network),
                valid_until=rule.valid_until, comment=comment, now=now)
            return rule_id, config_version_of(conn)

    def active_auto_blocks(self) -> int:
        """Automatic blocks in force now (stored or only in memory)."""
        now = self.clock()
        snap = self.cache.snapshot
        auto = snap.auto if snap is not None else AutoBlocks()
        stored = {k for d in (auto.by_net, auto.by_user) for k, r in d.items()
                  if r.active_at(now)}
        held = {k for k, p in self._held.items() if p.rule.active_at(now)}
        return len(stored | held)

    def unstored_auto_blocks(self) -> int:
        """Automatic blocks that could not be stored, held in memory until they expire."""
        now = self.clock()
        return sum(1 for p in self._held.values() if p.unstored and p.rule.active_at(now))

    async def drain(self, timeout: float) -> None:
        """Let failures being recorded and blocks being stored finish (shutdown)."""
        while self._tasks:
            done, _ = await asyncio.wait(list(self._tasks), timeout=timeout)
            if not done:
                log.error("event=policy_drain_timeout tasks=%d", len(self._tasks))
                return


def _span(seconds: float) -> str:
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s % size == 0 and s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _digest(user_key: str) -> bytes:
    """What failures per username are counted under: a fixed 16 bytes, so a
    flood of 16 KB names costs no more memory than short ones."""
    return hashlib.blake2b(user_key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _key_kv(key: str) -> tuple[str, str]:
    kind, _, value = key.partition(" ")
    return ("remote_ip" if kind == "address" else "user"), show(value)
