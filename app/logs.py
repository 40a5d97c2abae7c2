"""Log set-up: one line per event, key=value or JSON, on stderr."""

from __future__ import annotations

import json
import logging
import sys


def show(value: bytes | str | None) -> str:
    """A value safe for one log line: control bytes and quotes escaped."""
    if value is None:
        return "-"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and ch != " ":
            out.append(ch)
        elif ch == " ":
            out.append(" ")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    text = "".join(out)
    if len(text) > 256:
        text = text[:256] + f"...({len(value)} chars)"
    return f'"{text}"' if (" " in text or not text) else text


class _KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        return f"{stamp} level={record.levelname.lower()} {record.getMessage()}"


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
               "level": record.levelname.lower(), "logger": record.name}
        for part in _split_kv(record.getMessage()):
            key, _, value = part.partition("=")
            doc[key] = value.strip('"')
        return json.dumps(doc, ensure_ascii=False)


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


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if fmt == "json" else _KVFormatter())
    root = logging.getLogger("lastlogin")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
