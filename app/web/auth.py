"""The dashboard's one secret: web_token, as a Bearer header or a session cookie.

The cookie never holds the token: it holds an expiry and an HMAC of it
keyed by the token, so a stolen cookie ends with its expiry (or when the
token changes) and never reveals the token. Every comparison takes the
same time whatever the input.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

COOKIE = "lastlogin_session"
SESSION_SECONDS = 12 * 3600
_PURPOSE = b"lastlogin web session v1:"
_EXPIRES = re.compile(r"[0-9]{1,12}")     # ASCII digits: str.isdigit() also takes '²'


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def token_ok(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(_bytes(given), _bytes(token))


def bearer_ok(header: str | None, token: str) -> bool:
    """An ``Authorization: Bearer <token>`` header with the right token."""
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and token_ok(value.strip(), token)


def _signature(expires: int, token: str) -> str:
    return hmac.new(_bytes(token), _PURPOSE + str(expires).encode(), hashlib.sha256).hexdigest()


def session_value(token: str, now: float | None = None) -> str:
    expires = int(now if now is not None else time.time()) + SESSION_SECONDS
    return f"{expires}.{_signature(expires, token)}"


def session_ok(value: str | None, token: str, now: float | None = None) -> bool:
    expires, _, signature = (value or "").partition(".")
    if not _EXPIRES.fullmatch(expires):
        return False
    good = hmac.compare_digest(_bytes(signature), _signature(int(expires), token).encode())
    return good and int(expires) > (now if now is not None else time.time())


def safe_next(path: str | None) -> str:
    """Where to go after the login form: a path on this site, else the overview."""
    if (not path or not path.startswith("/") or path.startswith(("//", "/\\"))
            or not path.isprintable()):
        return "/"
    return path
