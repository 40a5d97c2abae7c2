"""%-templates in override values and alert texts, with Dovecot's names.

Dovecot does not expand variables in a post-login reply, so lastlogin does,
for each login, before the reply is built. Pure, no I/O.

Variables (Dovecot's own names; short, 2.3 long, 2.4 long):

    %u  %{user}                              the whole username
    %n  %{username}  %{user|username}        the part before the first @
    %d  %{domain}    %{user|domain}          the part after the first @ ('' if none)
    %s  %{service}   %{protocol}             imap, pop3, submission, managesieve
    %r  %{rip}       %{remote_ip}            the client's address
    %l  %{lip}       %{local_ip}             the server address it reached
    %%                                       a literal %

In alerts, the user's previous allowed login (read only when an alert shown
uses them; empty when there is none):

    %{last_login_time}  %{last_login_ip}  %{last_login_country}

Modifiers: ``%Lu``/``%L{user}`` lowercase, ``%Uu`` uppercase, and in the 2.4
form the filters ``| lower``, ``| upper``, ``| username``, ``| domain``.
Anything else is an unknown variable: refused when the value is set
(``check_template``), skipped by the loader.

A value for a path-like key (``mail``, ``home``, ``mail_path``, any
``*_path``/``*_dir``/``*_location``...) must not get a ``/``, a leading ``.``
or a control character from a variable, nor a ``:`` from the username
(2.3's ``maildir:PATH:INDEX=...`` parameters): that would let one user's
login reach another directory. Such a login is refused (``ExpansionRefused``),
never given an escaped or shared path.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import InvalidInput
from .login import control_char

# ASCII only, as Dovecot's %L and %U
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")

SHORT = {"u": "user", "n": "username", "d": "domain", "s": "service", "r": "rip", "l": "lip"}
LONG = {"user": "user", "username": "username", "domain": "domain", "service": "service",
        "protocol": "service", "rip": "rip", "remote_ip": "rip", "lip": "lip",
        "local_ip": "lip",
        # the user's previous allowed login (alerts: sshd's "Last login:" line)
        "last_login_time": "last_login_time", "last_login_ip": "last_login_ip",
        "last_login_country": "last_login_country"}
LAST_LOGIN_VARS = ("last_login_time", "last_login_ip", "last_login_country")
FILTERS = ("lower", "upper", "username", "domain")
_MODIFIERS = {"L": "lower", "U": "upper"}

class TemplateError(ValueError):
    """A template that cannot be expanded: an unknown variable or bad syntax."""


class ExpansionRefused(Exception):
    """This login's expansion would be unsafe; the login must not go on."""


@dataclass(frozen=True)
class Var:
    name: str                   # user, username, domain, service, rip, lip
    filters: tuple[str, ...]    # applied in order
    source: str                 # as written, for messages


Part = str | Var

_LONG_FORM = re.compile(r"\{([^{}]*)\}")


@functools.lru_cache(maxsize=4096)
def parse(text: str) -> tuple[Part, ...]:
    """The template's parts; TemplateError naming the first bad variable."""
    parts: list[Part] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "%":
            buf.append(ch)
            i += 1
            continue
        start = i
        i += 1
        if i < n and text[i] == "%":
            buf.append("%")
            i += 1
            continue
        filters: list[str] = []
        while i < n and text[i] in _MODIFIERS:
            filters.append(_MODIFIERS[text[i]])
            i += 1
        if i >= n:
            raise TemplateError(f"a lone % at the end: {text[start:]!r} (write %% for a %)")
        if text[i] == "{":
            m = _LONG_FORM.match(text, i)
            if m is None:
                raise TemplateError(f"unclosed %{{ in {text[start:]!r}")
            i = m.end()
            name, *more = [p.strip() for p in m.group(1).split("|")]
            if name not in LONG:
                raise TemplateError(f"unknown variable {text[start:i]!r}")
            for f in more:
                if f not in FILTERS:
                    raise TemplateError(f"unknown filter {f!r} in {text[start:i]!r}")
            var = Var(LONG[name], tuple(filters + more), text[start:i])
        else:
            letter = text[i]
            i += 1
            if letter not in SHORT:
                raise TemplateError(f"unknown variable {text[start:i]!r} (write %% for a %)")
            var = Var(SHORT[letter], tuple(filters), text[start:i])
        if buf:
            parts.append("".join(buf))
            buf = []
        parts.append(var)
    if buf:
        parts.append("".join(buf))
    return tuple(parts)


def uses_last_login(text: str) -> bool:
    """Does ``text`` use %{last_login_*}? (Only then is the previous login looked up.)"""
    try:
        parts = parse(text)
    except TemplateError:
        return False
    return any(isinstance(p, Var) and p.name in LAST_LOGIN_VARS for p in parts)


def check_template(field: str, text: str) -> str:
    """At the entrance (CLI, loader): InvalidInput if ``text`` cannot be expanded."""
    try:
        parse(text)
    except TemplateError as exc:
        raise InvalidInput(field, str(exc)) from None
    return text


# --- per login ------------------------------------------------------------------

@dataclass(frozen=True)
class LoginVars:
    """The values a template can use for one login."""

    user: str
    service: str
    rip: str = ""
    lip: str = ""
    exact: bool = True      # False: the username's bytes are not UTF-8 text
    last_login_time: str = ""       # the previous login ('' when none, or not looked up)
    last_login_ip: str = ""
    last_login_country: str = ""

    @classmethod
    def of(cls, username: bytes | str, service: str, rip: bytes | str | None = None,
           lip: bytes | str | None = None) -> "LoginVars":
        exact = True
        if isinstance(username, bytes):
            try:
                username = username.decode("utf-8")
            except UnicodeDecodeError:
                username, exact = username.decode("utf-8", "backslashreplace"), False
        return cls(username, service, _text(rip), _text(lip), exact)

    def value(self, name: str) -> str:
        if name == "user":
            return self.user
        if name == "username":
            return _username(self.user)
        if name == "domain":
            return _domain(self.user)
        return getattr(self, name)


def _text(v: bytes | str | None) -> str:
    if not v:
        return ""
    return v.decode("ascii", "replace") if isinstance(v, bytes) else v


# As Dovecot: the username part ends at the first @, the domain starts after it.
def _username(user: str) -> str:
    return user.split("@", 1)[0]


def _domain(user: str) -> str:
    return user.split("@", 1)[1] if "@" in user else ""


def _apply(value: str, filters: tuple[str, ...]) -> str:
    for f in filters:
        if f == "lower":
            value = value.translate(_ASCII_LOWER)
        elif f == "upper":
            value = value.translate(_ASCII_UPPER)
        elif f == "username":
            value = _username(value)
        elif f == "domain":
            value = _domain(value)
    return value


def expand(text: str, v: LoginVars, key: str | None = None) -> str:
    """``text`` with its variables replaced for this login.

    ``key`` is the override's key: for a path-like key every variable's value
    is checked (ExpansionRefused); None means an alert text.
    """
    parts = parse(text)
    if len(parts) == 1 and isinstance(parts[0], str):
        return parts[0]
    # Every userdb value is held to the path rules, not only the keys known
    # to be paths: Dovecot has too many that take a location (namespace/x/
    # location, *_dict = file:..., sieve_before, 2.4 filters) to list them.
    path = key is not None
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
            continue
        value = _apply(v.value(p.name), p.filters)
        where = f"{key}: {p.source}" if key else p.source
        if "\x00" in value:
            if key is None:         # an alert: shown as one line of text anyway
                value = value.replace("\x00", " ")
            else:
                raise ExpansionRefused(f"{where} would put a NUL byte in the value")
        if path:
            if not v.exact and p.name in ("user", "username", "domain"):
                raise ExpansionRefused(f"{where}: the username is not UTF-8 text")
            if not value and p.name in ("user", "username", "domain") and "/" in text:
                raise ExpansionRefused(f"{where} would be empty (a directory shared by all)")
            if "/" in value:
                raise ExpansionRefused(f"{where} would put a / into a path")
            if ":" in value and p.name in ("user", "username", "domain"):
                # 2.3's mail location takes :INDEX=, :CONTROL=, ... parameters
                raise ExpansionRefused(f"{where} would put a : into a mail location")
            if value.startswith("."):
                raise ExpansionRefused(f"{where} would start a path element with a .")
            bad = control_char(value)
            if bad:
                raise ExpansionRefused(f"{where} would put {bad} into a path")
        out.append(value)
    return "".join(out)


def expand_fields(wanted: dict[str, str], v: LoginVars) -> dict[str, str]:
    """Every override value expanded for this login (ExpansionRefused if unsafe)."""
    return {k: expand(val, v, k) for k, val in wanted.items()}
