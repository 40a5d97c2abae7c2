"""One login: decide, record, build the answer. No sockets here."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Callable

from .db.store import LoginRecord, normalize_ip
from .protocol import LoginRequest, build_reply
from .recorder import Recorder


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


class LoginService:
    def __init__(self, recorder: Recorder, record_timeout: float,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.recorder = recorder
        self.record_timeout = record_timeout
        self.clock = clock

    async def login(self, protocol: str, req: LoginRequest) -> Answer:
        record = make_record(protocol, req, "allowed", self.clock())
        # The fields go back unchanged: the session starts exactly as it
        # would without lastlogin.
        answer = Answer(record, build_reply(req.username, req.fields))
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
