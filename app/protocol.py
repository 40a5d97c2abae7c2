"""Dovecot post-login wire format: bytes <-> LoginRequest / reply bytes.

Pure: no I/O. See ../shared/docs/dovecot-postlogin-protocol.md, sections 3,
5, 6 and 9. Every value stays ``bytes`` so that nothing a user sends is
re-encoded on its way back to Dovecot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

VERSION_PREFIX = b"VERSION\tscript-login\t"
REQUEST_MAJOR = b"1"

_ESC = {0x01: b"\x011", 0x09: b"\x01t", 0x0D: b"\x01r", 0x0A: b"\x01n"}
_UNESC = {ord("0"): b"\x00", ord("1"): b"\x01", ord("t"): b"\t",
          ord("r"): b"\r", ord("n"): b"\n"}

# Userdb fields that are secrets: never stored, never logged (spec §14.18).


class ProtocolError(ValueError):
    """The peer sent something that is not a post-login request."""


_SPECIAL = re.compile(rb"[\x01\t\r\n]")
_SPECIAL_NO_TAB = re.compile(rb"[\x01\r\n]")


def tab_escape(value: bytes) -> bytes:
    if _SPECIAL.search(value) is None:
        return value
    return b"".join(_ESC.get(c, bytes((c,))) for c in value)


def tab_unescape(value: bytes) -> bytes:
    # find, not "in": bytes.__contains__ first tries its argument as an
    # integer and raises (and drops) a TypeError -- 3.5 % of the event
    # loop's work per login went to that, one field at a time.
    if value.find(b"\x01") < 0:
        return value
    out, i, n = bytearray(), 0, len(value)
    while i < n:
        c = value[i]
        if c != 0x01:
            out.append(c)
            i += 1
            continue
        if i + 1 >= n:              # a trailing \001 is dropped, as Dovecot does
            break
        nxt = value[i + 1]
        out += _UNESC.get(nxt, bytes((nxt,)))
        i += 2
    return bytes(out)


def split_tabescaped(line: bytes) -> list[bytes]:
    """Cut at every raw TAB, then un-escape; an empty line has no fields."""
    if not line:
        return []
    return [tab_unescape(part) for part in line.split(b"\t")]


def field_key(f: bytes) -> bytes:
    """The key of a userdb field (a bare word is its own key)."""
    return f.split(b"=", 1)[0]


def field_value(fields: list[bytes], key: bytes) -> bytes | None:
    prefix = key + b"="
    for f in fields:
        if f.startswith(prefix):
            return f[len(prefix):]
    return None


@dataclass(frozen=True)
class LoginRequest:
    """One decoded post-login request."""

    local_ip: bytes
    remote_ip: bytes
    username: bytes
    fields: list[bytes] = field(default_factory=list)

    @property
    def auth_mech(self) -> bytes | None:
        return field_value(self.fields, b"auth_mech")

    @property
    def master_user(self) -> bytes | None:
        return field_value(self.fields, b"master_user")

    @property
    def auth_user(self) -> bytes | None:
        return field_value(self.fields, b"auth_user")


def request_complete(buf: bytes | bytearray) -> bool:
    """A request is two LF-terminated lines; the peer never sends EOF."""
    first = buf.find(b"\n")
    return first >= 0 and buf.find(b"\n", first + 1) >= 0


def parse_request(buf: bytes) -> LoginRequest:
    """Decode a complete request (version line + data line).

    Raises ProtocolError with a short reason on anything else.
    """
    first = buf.find(b"\n")
    second = buf.find(b"\n", first + 1) if first >= 0 else -1
    if second < 0:
        raise ProtocolError("incomplete request")
    if second != len(buf) - 1:
        raise ProtocolError("bytes after the request")
    _check_version(buf[:first])
    parts = split_tabescaped(buf[first + 1:second])
    if len(parts) < 3:
        raise ProtocolError(f"missing input fields ({len(parts)} of at least 3)")
    local_ip, remote_ip, username = parts[0], parts[1], parts[2]
    if not username:
        raise ProtocolError("empty username")
    # 2.3 writes an empty field after the username when userdb returned none;
    # an empty field carries nothing and Dovecot drops it too.
    fields = [f for f in parts[3:] if f]
    return LoginRequest(local_ip, remote_ip, username, fields)


def _check_version(line: bytes) -> None:
    if not line.startswith(VERSION_PREFIX):
        raise ProtocolError("not a script-login client (wrong socket?)")
    rest = line[len(VERSION_PREFIX):].split(b"\t")
    if len(rest) != 2 or rest[0] != REQUEST_MAJOR or not rest[1].isdigit():
        raise ProtocolError(f"unsupported protocol version {line[8:]!r}")


def build_request(local_ip: bytes, remote_ip: bytes, username: bytes,
                  fields: list[bytes]) -> bytes:
    """The request exactly as Dovecot's mail process writes it."""
    data = [local_ip, remote_ip, tab_escape(username)]
    data += [tab_escape(f) for f in fields]
    return b"VERSION\tscript-login\t1\t0\n" + b"\t".join(data) + b"\n"


def build_reply(username: bytes, fields: list[bytes]) -> bytes:
    """One line: the username, then the complete userdb field list."""
    if not username:
        raise ValueError("a reply needs a username (an empty one crashes Dovecot)")
    line = b"\t".join([username, *fields])
    # The common case: nothing to escape (no TAB but the separators, no
    # \001, CR or LF), checked on the joined line in two C calls.
    if line.count(b"\t") == len(fields) and _SPECIAL_NO_TAB.search(line) is None:
        return line + b"\n"
    return b"\t".join([tab_escape(username), *(tab_escape(f) for f in fields)]) + b"\n"


def parse_reply(line: bytes) -> tuple[bytes, list[bytes]]:
    """The mail process's view of a reply: the inverse of ``build_reply``."""
    if not line.endswith(b"\n"):
        raise ProtocolError("reply does not end in LF")
    parts = split_tabescaped(line[:-1])
    if not parts:
        raise ProtocolError("empty reply")
    return parts[0], parts[1:]



# --- messages to the client on a refusal (spec §9.2) -----------------------

DEFAULT_DENY_TEXT = "Access denied."


def sanitize_message(text: str, limit: int = 400) -> bytes:
    """One line of printable text: no CR/LF (no protocol injection)."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    cleaned = " ".join(cleaned.split())[:limit] or DEFAULT_DENY_TEXT
    return cleaned.encode("utf-8")


def _sieve_quoted(msg: bytes) -> bytes:
    return b'"' + msg.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# The goodbye lines, per protocol: (prefix, quoted as a ManageSieve string).
_DENY = {"imap": b"* BYE [ALERT] ", "pop3": b"-ERR [AUTH] ", "submission": b"421 4.7.0 ",
         "managesieve": b"BYE "}
_TEMPFAIL = {"imap": b"* BYE [UNAVAILABLE] ", "pop3": b"-ERR [SYS/TEMP] ",
             "submission": b"421 4.3.0 ", "managesieve": b"BYE (TRYLATER) "}


def _goodbye(prefixes: dict[str, bytes], protocol: str, text: str) -> bytes:
    try:
        prefix = prefixes[protocol]
    except KeyError:
        raise ValueError(f"unknown protocol {protocol!r}") from None
    msg = sanitize_message(text)
    return prefix + (_sieve_quoted(msg) if protocol == "managesieve" else msg) + b"\r\n"


def deny_line(protocol: str, text: str) -> bytes:
    """What a client refused by a rule sees: a permanent 'no'."""
    return _goodbye(_DENY, protocol, text)


TEMPFAIL_TEXT = "Temporary server failure, try again later."


def tempfail_line(protocol: str, text: str = TEMPFAIL_TEXT) -> bytes:
    """What a client sees when lastlogin cannot let it in for now.

    The protocol's own "try again later": IMAP ``[UNAVAILABLE]`` (RFC 5530),
    POP3 ``[SYS/TEMP]`` (RFC 3206, what Dovecot itself sends on internal
    failures), SMTP ``421 4.3.0`` (RFC 3463: mail system status, transient),
    ManageSieve ``(TRYLATER)`` (RFC 5804). Used when rules are not loaded,
    when the spool is full, when an override cannot be expanded safely and
    when the next post-login hop answers with something unusable.
    """
    return _goodbye(_TEMPFAIL, protocol, text or TEMPFAIL_TEXT)


def alert_line(text: str) -> bytes:
    """An IMAP alert shown before the session starts (IMAP only)."""
    return b"* OK [ALERT] " + sanitize_message(text) + b"\r\n"
