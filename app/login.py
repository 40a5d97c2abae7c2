"""What a login is: the value types and the one normaliser of names and addresses.

Pure, no I/O, and imports nothing of lastlogin's but its errors: the wire
codec, the policy, the service, the recorder and the database layer all
import it. The CLI, the loader, the daemon and `lastlogin check` go through
these functions, so a scope written one way matches a login written another
way everywhere or nowhere, and what is stored is what was matched:

* a username is trimmed; it matches case-insensitively (Dovecot's default
  ``auth_username_format = %Lu`` lowercases it anyway);
* a domain is trimmed, lowercased and loses a leading ``@``;
* an address is parsed once; an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``)
  counts as the IPv4 address -- for matching and for storing alike -- and a
  network inside ``::ffff:0:0/96`` as the IPv4 network, so a rule matches
  both spellings of one client and the history shows one;
* a username is stored as text (``username_text``), bounded for the
  database's indexes, with its exact bytes beside it when the text cannot
  hold them.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import random
import re
import uuid
from dataclasses import dataclass
from typing import Union

from .errors import InvalidInput

PROTOCOLS = ("imap", "pop3", "submission", "managesieve")
ALLOWED, DENIED = "allowed", "denied"
FAILED = "failed"           # an authentication Dovecot's policy client reported as failed
OUTCOMES = (ALLOWED, DENIED, FAILED)

IPNet = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")

# C0 controls, DEL and C1 controls: never wanted in a message, a comment or a value.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


_BLANK = " \t"      # what is trimmed: ASCII blanks only (Dovecot trims nothing)


def normalize_user(value: str) -> str:
    """A username as stored: surrounding blanks removed, case kept."""
    return value.strip(_BLANK)


# ASCII only, as Dovecot's %L does: Unicode's rules would make a Kelvin sign
# (U+212A) match "k" here while Dovecot keeps them apart.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def user_key(value: str) -> str:
    """What two usernames are compared by: trimmed and lowercased (ASCII)."""
    return value.strip(_BLANK).translate(_ASCII_LOWER)


def normalize_domain(value: str) -> str:
    """A domain as stored and compared: trimmed, lowercased (ASCII), no leading @."""
    return value.strip(_BLANK).lstrip("@").strip(_BLANK).translate(_ASCII_LOWER)


def domain_of(username: str) -> str | None:
    """The domain of a login's username, or None: after the first @, as
    Dovecot's %d (and lastlogin's templates) take it."""
    if "@" not in username:
        return None
    return normalize_domain(username.split("@", 1)[1]) or None


def scope_value(scope: str, value: str | None, field: str | None = None) -> str:
    """A scope's value as stored ('' for global); InvalidInput if empty."""
    if scope == "global":
        return ""
    normalise = normalize_domain if scope == "domain" else normalize_user
    return normalized_name(field or scope, value or "", normalise)


def normalized_name(field: str, value: str, normalise) -> str:
    """``value`` through ``normalise``; InvalidInput when that leaves nothing
    or a control character (one check for rules' and overrides' scopes)."""
    out = normalise(value)
    if not out:
        raise InvalidInput(field, "must not be empty")
    bad = control_char(out)
    if bad:
        raise InvalidInput(field, f"must not contain {bad}")
    return out


def scope_key(scope: str, value: str) -> str:
    """What a stored scope value is compared by."""
    if scope == "user":
        return user_key(value)
    if scope == "domain":
        return normalize_domain(value)
    return ""


def control_char(text: str) -> str | None:
    """A name for the first control character in ``text``, or None."""
    m = _CONTROL.search(text)
    if m is None:
        return None
    ch = m.group()
    names = {"\x00": "a NUL byte", "\t": "a TAB", "\n": "a line feed", "\r": "a CR"}
    return names.get(ch, f"a control character (0x{ord(ch):02x})")


def printable(value):
    """A value for a terminal table: control characters shown as escapes.

    Rows written with SQL may hold them; printed raw, a CR or an escape
    sequence would rewrite what the operator sees.
    """
    if not isinstance(value, str) or _CONTROL.search(value) is None:
        return value
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), value)


def check_text(field: str, text: str | None) -> str | None:
    """A message or comment: refused if it holds a control character."""
    if text is None:
        return None
    bad = control_char(text)
    if bad:
        raise InvalidInput(field, f"must not contain {bad}")
    return text


# --- addresses --------------------------------------------------------------

@functools.lru_cache(maxsize=65536)      # addresses repeat; parsing them is not cheap
def _parse_ip(value: str | bytes) -> IPAddr | None:
    """Keyed by the value as it came (bytes from the wire, or text): no
    decoding before the cache is consulted."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0].strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_ip(value: str | bytes | None) -> IPAddr | None:
    """An address for matching, or None when absent or not an address.

    An IPv6 zone (``fe80::1%eth0``) is dropped; an IPv4-mapped IPv6 address
    counts as IPv4.
    """
    if not value:
        return None
    return _parse_ip(value)


def parse_network(text: str, strict: bool = False) -> IPNet:
    """A network for matching; ValueError when it is not one.

    ``strict``: host bits set (``10.1.2.3/8``) are an error rather than
    masked off. A network inside ``::ffff:0:0/96`` becomes the IPv4 network
    it maps, so it matches the same clients as the IPv4 spelling.
    """
    net = ipaddress.ip_network(text.strip(), strict=strict)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96), strict=strict)
    return net


def in_network(addr: IPAddr | None, net: IPNet | None) -> bool:
    """Does ``addr`` lie in ``net``? (None ``net``: any address, even none.)"""
    if net is None:
        return True
    if addr is None or addr.version != net.version:
        return False
    return addr in net


def normalize_ip(value: str | bytes | None) -> str | None:
    """An address as stored: canonical text, IPv4 for a v4-mapped one; None
    when absent or not an address (the same parse as matching)."""
    if not value:
        return None
    return _stored_ip(value)


@functools.lru_cache(maxsize=65536)     # str() of an address is slow Python code
def _stored_ip(value: str | bytes) -> str | None:
    addr = _parse_ip(value)
    return None if addr is None else str(addr)


STORE_IP_MODES = ("full", "truncated", "none")
# What "truncated" keeps: a /24 of IPv4 and a /48 of IPv6 (a site), enough
# to tell networks apart, not enough to name a household.
TRUNCATE_V4, TRUNCATE_V6 = 24, 48


def stored_ip(value: str | None, mode: str = "full") -> str | None:
    """A normalised address (``normalize_ip``) as the ``store_ip`` setting keeps it:
    whole, its network's first address (truncated), or nothing."""
    if value is None or mode == "full":
        return value
    if mode == "none":
        return None
    addr = ipaddress.ip_address(value)
    bits = TRUNCATE_V4 if addr.version == 4 else TRUNCATE_V6
    return str(ipaddress.ip_network((addr, bits), strict=False).network_address)


_COUNTRY = re.compile(r"[A-Z]{2}\Z")


def country_code(value: str, field: str = "country") -> str:
    """An ISO 3166-1 alpha-2 code as stored and matched: two letters, upper case."""
    code = value.strip(_BLANK).upper()
    if not _COUNTRY.match(code):
        raise InvalidInput(field, f"not a two-letter country code: {value!r}")
    return code


def asn_number(value: str | int, field: str = "asn") -> int:
    """An autonomous system number (``AS3320`` or ``3320``)."""
    text = str(value).strip(_BLANK)
    if text[:2].upper() == "AS":
        text = text[2:]
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 2**32:
        raise InvalidInput(field, f"not an AS number: {value!r}")
    return int(text)


# --- usernames as stored --------------------------------------------------------

def text_form(value: bytes) -> tuple[str, bytes | None]:
    """(text to store, exact bytes when the text cannot hold them).

    Valid UTF-8 without NUL is stored as it is. Anything else is shown with
    \\xNN escapes and its exact bytes are kept beside it, so nothing is lost.
    """
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("utf-8", "backslashreplace")
        return text.replace("\x00", "\\x00"), value
    if "\x00" in text:
        return text.replace("\x00", "\\x00"), value
    return text, None


# Longest username text stored as the key of a row. PostgreSQL's btree index
# rows hold at most ~2.7 kB, so a longer username (which Dovecot can send)
# would be refused by the database. Longer ones are stored as a prefix plus
# their SHA-256 -- the same name always gives the same key -- with the exact
# bytes beside it in username_raw.
NAME_TEXT_MAX = 1024
_NAME_PREFIX = NAME_TEXT_MAX - 96


def username_text(value: bytes) -> tuple[str, bytes | None]:
    """(key text to store, exact bytes when the text does not hold them).

    Like ``text_form``, and bounded to ``NAME_TEXT_MAX`` UTF-8 bytes. Every
    place that stores or looks up a username by its text uses this.
    """
    text, raw = text_form(value)
    encoded = text.encode("utf-8")
    if len(encoded) <= NAME_TEXT_MAX:
        return text, raw
    prefix = encoded[:_NAME_PREFIX].decode("utf-8", "ignore")
    digest = hashlib.sha256(value).hexdigest()
    return f"{prefix}...[{len(value)} bytes sha256:{digest}]", value


# --- one login as it is stored ----------------------------------------------------

_random = random.Random()     # seeded from os.urandom when the module loads


def new_event_id() -> uuid.UUID:
    """A random (version 4) UUID without a system call per login.

    Event ids need to be unique, not secret: a PRNG seeded from the OS per
    process gives 122 random bits, as uuid4() does with os.urandom.
    """
    return uuid.UUID(int=_random.getrandbits(128), version=4)


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """One login as it is stored (and spooled)."""

    event_id: uuid.UUID
    occurred_at: dt.datetime
    username: bytes
    protocol: str
    remote_ip: str | None
    local_ip: str | None
    outcome: str
    rule_id: int | None = None
    auth_mech: bytes | None = None
    master_user: bytes | None = None
    auth_user: bytes | None = None
    alerts_shown: tuple[int, ...] = ()      # show-once alerts this login displayed
    message: str | None = None              # what a refused client was told
    policy_applied: bool = True             # False: decided without rules loaded
    host: str | None = None                 # the mail host that saw it
    country: str | None = None              # ISO 3166-1 alpha-2, from the full address
    asn: int | None = None
    session_id: str | None = None           # Dovecot's session id, when known

    def event_row(self) -> dict[str, object]:
        name, raw = username_text(self.username)
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "username": name,
            "username_raw": raw,
            "protocol": self.protocol,
            "remote_ip": self.remote_ip,
            "local_ip": self.local_ip,
            "outcome": self.outcome,
            "rule_id": self.rule_id,
            "auth_mech": _opt_text(self.auth_mech),
            "master_user": _opt_text(self.master_user),
            "auth_user": _opt_text(self.auth_user),
            "message": self.message,
            "policy_applied": self.policy_applied,
            "host": self.host,
            "country": self.country,
            "asn": self.asn,
            "session_id": self.session_id,
        }


def _opt_text(value: bytes | None) -> str | None:
    return None if value is None else text_form(value)[0]
