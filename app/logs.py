"""Log set-up: one line per event, key=value or JSON, on stderr.

Messages are written as ``event=name key=%s ...``. Whatever fills a ``%s``
is escaped here (``show``) unless the caller did it already, so text from a
peer or the database can neither break the line (CR, LF, ESC...) nor add a
key: in JSON, ``time``/``level``/``logger`` and every key already set win
over anything later. Known secrets (the database password) are replaced by
``***`` in every line, tracebacks included.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from typing import Iterable


class Shown(str):
    """Text that ``show`` made safe already (not escaped twice)."""


# What needs no escaping and no quotes: printable ASCII but space, '"', '=' and '\\'.
_PLAIN = re.compile(r'[!#-<>-\[\]-~]{1,256}\Z')
_PLAIN_BYTES = re.compile(rb'[!#-<>-\[\]-~]{1,256}\Z')


def show(value: bytes | str | None) -> str:
    """A value safe for one log line: control bytes and quotes escaped."""
    if value is None:
        return Shown("-")
    if isinstance(value, Shown):
        return value
    # The common case -- a plain name, an address, a mechanism -- in C.
    if isinstance(value, str):
        if _PLAIN.match(value):
            return Shown(value)
    elif _PLAIN_BYTES.match(value):
        return Shown(value.decode("ascii"))
    total = len(value)
    if isinstance(value, bytes):
        value = value[:1024].decode("utf-8", "backslashreplace")
    out = []
    for ch in value[:257]:          # never a loop over a 1 MiB username
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and ch != " ":
            out.append(ch)
        elif ch == " ":
            out.append(" ")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    text = "".join(out)
    if len(text) > 256 or total > 257:
        text = text[:256] + f"...({total} chars)"
    return Shown(f'"{text}"' if (" " in text or "=" in text or not text) else text)


_SECRETS: tuple[str, ...] = ()


def set_secrets(secrets: Iterable[str]) -> None:
    """Strings replaced by *** in every log line (longest first)."""
    global _SECRETS
    _SECRETS = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))


def redact(text: str) -> str:
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def _safe_arg(arg: object) -> object:
    if isinstance(arg, (Shown, int, float)) or arg is None:
        return arg
    if type(arg) is str and _PLAIN.match(arg):
        return arg                  # as show() would, without the Shown copy
    return show(arg if isinstance(arg, (str, bytes)) else str(arg))


def _controls(text: str) -> str:
    """Escape what could still end or steer the line (if a caller put text
    into the format string itself)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def message_of(record: logging.LogRecord) -> str:
    """The record's message with every argument escaped and secrets redacted."""
    return text_of(str(record.msg), record.args)


def first_line(exc: BaseException) -> str:
    """An error as one line: its message's first line, or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def text_of(msg: str, args: object) -> str:
    """``msg % args`` with every argument escaped and secrets redacted."""
    if args:
        try:
            if isinstance(args, dict):
                msg = msg % {k: _safe_arg(v) for k, v in args.items()}
            else:
                msg = msg % tuple(map(_safe_arg, args))     # type: ignore[call-overload]
        except (TypeError, ValueError):
            msg = f"{msg} args={show(repr(args))}"
    return redact(_controls(msg))


def _traceback_of(record: logging.LogRecord) -> str | None:
    if not record.exc_info:
        return None
    text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
    return redact(text)


def _stamp(created: float) -> str:
    """What ``Formatter.formatTime(record, DATEFMT)`` writes (local time)."""
    return time.strftime(DATEFMT, time.localtime(created))


DATEFMT = "%Y-%m-%dT%H:%M:%S"


class _StampCache:
    """The time stamp, formatted once per second rather than once per line."""

    _second = -1
    _stamp = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = _stamp(created)
            self._second = second
        return self._stamp


class _LineFormatter(logging.Formatter):
    """Ours: a line from its parts, for a record or for ``emit`` (no record)."""

    def format(self, record: logging.LogRecord) -> str:
        return self.line(record.created, record.levelname.lower(), record.name,
                         message_of(record), _traceback_of(record))

    def line(self, created: float, level: str, name: str, message: str,
             tb: str | None = None) -> str:
        raise NotImplementedError


class _KVFormatter(_LineFormatter):
    def __init__(self) -> None:
        super().__init__()
        self._stamps = _StampCache()

    def line(self, created: float, level: str, name: str, message: str,
             tb: str | None = None) -> str:
        line = f"{self._stamps.stamp(created)} level={level} {message}"
        if tb:      # whole, on the same line: newlines and quotes escaped
            quoted = tb.replace("\\", "\\\\").replace('"', '\\"')
            line += f' traceback="{_controls(quoted)}"'
        return line


_KEY = re.compile(r"[a-z][a-z0-9_]*\Z")


class _JSONFormatter(_LineFormatter):
    def line(self, created: float, level: str, name: str, message: str,
             tb: str | None = None) -> str:
        doc: dict[str, object] = {"time": _stamp(created), "level": level, "logger": name}
        unparsed = []
        for part in _split_kv(message):
            key, sep, value = part.partition("=")
            if sep and _KEY.match(key) and key not in doc:
                quoted = len(value) >= 2 and value[0] == value[-1] == '"'
                doc[key] = value[1:-1] if quoted else value
            else:
                unparsed.append(part)       # never overwrites a key
        if unparsed:
            doc["_unparsed"] = " ".join(unparsed)
        if tb:
            doc["_traceback"] = tb
        return json.dumps(doc, ensure_ascii=True)


def _split_kv(message: str) -> list[str]:
    parts, cur, quoted, escaped = [], [], False, False
    for ch in message:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            cur.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == " " and not quoted:
            if cur:
                parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return parts


def setup_logging(level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
    set_secrets(secrets)
    # No line shows the caller's file, thread or process: do not work them
    # out for every record (the logging docs' "Optimization" section).
    logging._srcfile = None             # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if fmt == "json" else _KVFormatter())
    root = logging.getLogger("lastlogin")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
           logging.ERROR: "error", logging.CRITICAL: "critical"}


def emit(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """``logger.log(level, msg, *args)`` without a LogRecord, for the one line
    per login: the same text to the same handlers, when those are ours (a
    plain StreamHandler with our formatter and no filters); the ordinary
    way otherwise. Building, filtering and formatting a LogRecord costs
    more than the rest of the line."""
    if not logger.isEnabledFor(level):
        return
    handlers = _our_handlers(logger, level)
    if handlers is None:
        logger.log(level, msg, *args)
        return
    message = text_of(msg, args)
    name, lname = logger.name, _LEVELS[level]
    for h in handlers:
        # Stamped and formatted under the handler's lock, as Handler.handle
        # formats: the formatter's stamp cache is shared with other
        # threads' lines, and lines reach the stream in time order.
        h.acquire()
        try:
            line = h.formatter.line(time.time(), lname, name, message)  # type: ignore[union-attr]
            h.stream.write(line + h.terminator)
            h.flush()
        except Exception:  # noqa: BLE001 - as StreamHandler.emit does
            h.handleError(logging.LogRecord(name, level, "", 0, msg, args, None))
        finally:
            h.release()


def _our_handlers(logger: logging.Logger, level: int) -> list[logging.StreamHandler] | None:
    """The handlers a record of ``logger`` would reach (as Logger.callHandlers
    finds them), if every one of them is one ``emit`` can write to; else None."""
    if logger.disabled or logger.filters or level not in _LEVELS:
        return None
    found: list[logging.StreamHandler] = []
    node: logging.Logger | None = logger
    while node is not None:
        for h in node.handlers:
            if (type(h) is not logging.StreamHandler or h.filters or level < h.level
                    or not isinstance(h.formatter, _LineFormatter)):
                return None
            found.append(h)
        if not node.propagate:
            break
        node = node.parent
    return found or None
