"""One login: decide, record, build the answer. No sockets here."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Callable

from .db.store import LoginRecord, normalize_ip, text_form
from .policy import ALLOW, Decision, LoginFacts, decide
from .protocol import DEFAULT_DENY_TEXT, LoginRequest, build_reply, deny_line
from .recorder import Recorder
from .snapshot import ConfigCache


class RecordError(Exception):
    """The login could not be recorded in time; it must not be acknowledged."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Answer:
    """What the server sends: a reply line to Dovecot, or None to refuse."""

    record: LoginRecord
    reply: bytes | None
    to_client: bytes | None = None
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.reply is not None


def make_record(protocol: str, req: LoginRequest, outcome: str,
                now: dt.datetime, rule_id: int | None = None) -> LoginRecord:
    return LoginRecord(
        event_id=uuid.uuid4(),
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
    )


@dataclass
class Policy:
    """What the service decides with: the cache and the two fallbacks."""

    cache: ConfigCache
    default_action: str = ALLOW
    unloaded_action: str = ALLOW

    def decide(self, protocol: str, req: LoginRequest, now: dt.datetime) -> Decision:
        facts = LoginFacts.of(protocol, text_form(req.username)[0],
                              normalize_ip(req.remote_ip), normalize_ip(req.local_ip), now)
        return decide(self.cache.rules, facts, self.default_action, self.unloaded_action)


class LoginService:
    def __init__(self, recorder: Recorder, policy: Policy, record_timeout: float,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.recorder = recorder
        self.policy = policy
        self.record_timeout = record_timeout
        self.clock = clock

    async def login(self, protocol: str, req: LoginRequest) -> Answer:
        now = self.clock()
        decision = self.policy.decide(protocol, req, now)
        rule_id = decision.rule.id if decision.rule else None
        if decision.allowed:
            record = make_record(protocol, req, "allowed", now, rule_id)
            answer = Answer(record, build_reply(req.username, req.fields),
                            reason=decision.reason)
        else:
            record = make_record(protocol, req, "denied", now, rule_id)
            text = decision.message or DEFAULT_DENY_TEXT
            answer = Answer(record, None, deny_line(protocol, text), reason=decision.reason)
        await self._commit(record)
        return answer

    async def _commit(self, record: LoginRecord) -> None:
        fut = asyncio.wrap_future(self.recorder.submit(record))
        try:
            await asyncio.wait_for(fut, self.record_timeout)
        except asyncio.TimeoutError:
            raise RecordError(f"not committed within {self.record_timeout:g}s") from None
        except Exception as exc:  # noqa: BLE001 - the database said no
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RecordError(first) from exc
