"""Authentication attempts as Dovecot's policy client sends them: pure, no I/O.

Dovecot's auth process POSTs one JSON object per request to the policy
server (docs/policy-server.md): ``command=allow`` before (and after) the
password check, ``command=report`` when authentication ended, with
``success`` and ``policy_reject`` added. Its members are the ones named in
``auth_policy_request_attributes``; lastlogin reads ``login``, ``remote``,
``local``, ``protocol``, ``session_id`` and (2.4) ``fail_type``, and ignores
the rest (``pwhash``, ``device_id``, ``tls``, nested ``attrs/...``).

``FailureWindows`` counts failures per key (an address, a username) in a
sliding window, in memory: what automatic blocks are decided on.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass

from .errors import InvalidInput
from .login import PROTOCOLS

ALLOW, REPORT = "allow", "report"
COMMANDS = (ALLOW, REPORT)

# Dovecot's service names (%s / %{protocol}) for the protocols lastlogin
# stores; "sieve" is ManageSieve's. Others (smtp for Postfix SASL, doveadm)
# are decided and counted, but have no protocol to be stored under.
_SERVICES = {p: p for p in PROTOCOLS} | {"sieve": "managesieve"}


def service_protocol(name: str | None) -> str | None:
    """The stored protocol for Dovecot's service name, or None."""
    if not name:
        return None
    return _SERVICES.get(name.strip().lower())


@dataclass(frozen=True)
class Attempt:
    """One request of Dovecot's policy client."""

    command: str
    login: str                      # the username as the client gave it
    remote_ip: str | None
    local_ip: str | None
    service: str                    # Dovecot's service name, as sent ("" when absent)
    session_id: str | None = None
    success: bool | None = None     # report only
    policy_reject: bool = False     # report only: refused by the policy server
    fail_type: str | None = None    # 2.4: why it failed (credentials, account, ...)

    @property
    def protocol(self) -> str | None:
        return service_protocol(self.service)

    @property
    def username_bytes(self) -> bytes:
        # JSON text holds no bytes that are not UTF-8; a lone surrogate from a
        # \\udXXX escape is kept visible rather than refused.
        return self.login.encode("utf-8", "backslashreplace")

    def failure_reason(self) -> str:
        """What a failed row's message says."""
        if self.policy_reject:
            return "refused by the policy server before authentication"
        if self.fail_type:
            return f"authentication failed: {self.fail_type}"
        return "authentication failed"


def _text(doc: dict, key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(key, f"must be a string, got {type(value).__name__}")
    return value


def parse_attempt(command: str, body: bytes) -> Attempt:
    """The attempt in one request body; InvalidInput naming what is wrong."""
    if command not in COMMANDS:
        raise InvalidInput("command", f"must be allow or report, got {command[:40]!r}")
    try:
        doc = json.loads(body)
    except RecursionError:          # [[[[... a few thousand deep fits in the body
        raise InvalidInput("body", "not JSON Dovecot sends: nested too deeply") from None
    except ValueError as exc:       # JSONDecodeError, UnicodeDecodeError, and an
        # integer over 4300 digits (the int/str conversion limit)
        raise InvalidInput("body", f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("body", "must be a JSON object")
    login = _text(doc, "login")
    if login is None:
        raise InvalidInput("login", "missing (auth_policy_request_attributes must "
                                    "send login)")
    success = doc.get("success")
    reject = doc.get("policy_reject", False)
    if command == REPORT:
        if not isinstance(success, bool):
            raise InvalidInput("success", "a report needs success: true or false")
        if not isinstance(reject, bool):
            raise InvalidInput("policy_reject", "must be true or false")
    else:
        success, reject = None, False
    return Attempt(command=command, login=login,
                   remote_ip=_text(doc, "remote") or None, local_ip=_text(doc, "local") or None,
                   service=_text(doc, "protocol") or "",
                   session_id=_text(doc, "session_id") or None,
                   success=success, policy_reject=reject,
                   fail_type=_text(doc, "fail_type") or None)


def answer(status: int, msg: str = "") -> bytes:
    """A response body: status < 0 rejects, 0 lets authentication go on."""
    return json.dumps({"status": status, "msg": msg}, ensure_ascii=True).encode()


class FailureWindows:
    """Failures per key in the last ``window`` seconds (times are floats).

    Memory is bounded: at most ``max_keys`` keys are held; past that the key
    whose last failure is oldest is forgotten first. Keys are short (an
    address, a 16-byte digest of a username), so the bound is one of size
    too: about 20,000 x (key + a few timestamps) ~ a few MB per counter.
    """

    def __init__(self, window: float, max_keys: int = 20_000) -> None:
        self.window = window
        self.max_keys = max_keys
        self._hits: collections.OrderedDict[str | bytes, collections.deque[float]] = (
            collections.OrderedDict())

    def add(self, key: str | bytes, now: float) -> int:
        """Count a failure of ``key`` at ``now``; the failures in the window."""
        hits = self._hits.pop(key, None)
        if hits is None:
            hits = collections.deque()
        hits.append(now)
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        self._hits[key] = hits              # most recent last
        while len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)
        return len(hits)

    def count(self, key: str | bytes, now: float) -> int:
        hits = self._hits.get(key)
        return 0 if hits is None else sum(1 for t in hits if t > now - self.window)

    def clear(self, key: str | bytes) -> None:
        self._hits.pop(key, None)

    def __len__(self) -> int:
        return len(self._hits)
