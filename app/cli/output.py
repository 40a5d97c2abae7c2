r"""One --format option for every listing command: table, csv or json.

Values come from outside (usernames from Dovecot, messages and override
values from whoever may write rules): none reaches the operator's terminal
or spreadsheet able to act. Control and other non-printable characters (ESC,
CR, LF, C1, bidi overrides...) are shown escaped (``\x1b``, ``\u202e``) in
table and CSV, and as JSON ``\uXXXX`` escapes (lossless) in JSON; a CSV
cell from outside that would start a formula gets a leading ``'``.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from decimal import Decimal
from typing import Any, Iterable, Sequence

import click

FORMATS = ("table", "csv", "json")

format_option = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
    help="Output format.")


def _escape_char(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else (f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")


def safe_text(text: str) -> str:
    """``text`` with every non-printable character escaped visibly."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(text: str) -> str:
    """A spreadsheet takes a cell starting with = + - @ (or TAB/CR) for a
    formula: such text gets a leading apostrophe, the usual neutraliser."""
    return "'" + text if text.startswith(FORMULA_START) else text


def json_safe(doc: str) -> str:
    """JSON text whose non-printable characters (C1, bidi, ... that
    json.dumps leaves raw with ensure_ascii=False) are \\u escapes; the
    decoded values stay exactly the same."""
    out = []
    for ch in doc:
        if ch.isprintable() or ch == "\n":
            out.append(ch)
        else:
            n = ord(ch)
            out.append(f"\\u{n:04x}" if n < 0x10000 else
                       "\\u{:04x}\\u{:04x}".format(0xD800 + ((n - 0x10000) >> 10),
                                                  0xDC00 + ((n - 0x10000) & 0x3FF)))
    return "".join(out)


def cell(value: Any, fmt: str) -> Any:
    """A value as shown in ``fmt``; text is made safe (``_cell`` + escaping)."""
    out = _cell(value, fmt)
    if isinstance(out, str) and fmt != "json":
        out = safe_text(out)
        if fmt == "csv" and isinstance(value, (str, bytes)):
            out = csv_safe(out)
    return out


def _cell(value: Any, fmt: str) -> Any:
    if isinstance(value, Decimal):      # PostgreSQL's sum() of integers
        value = int(value) if value == value.to_integral_value() else float(value)
    if value is None:
        return "" if fmt != "json" else None
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, bool):
        return value if fmt == "json" else ("yes" if value else "no")
    if fmt == "json" and isinstance(value, (int, float)):
        return value
    return str(value)


def render(rows: Iterable[dict[str, Any]], columns: Sequence[str], fmt: str,
           out=None) -> None:
    out = out or sys.stdout
    table = [[cell(r.get(c), fmt) for c in columns] for r in rows]
    if fmt == "json":
        out.write(json_safe(json.dumps([dict(zip(columns, r)) for r in table],
                                       ensure_ascii=False, indent=1)))
        out.write("\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        w.writerows(table)
    else:
        widths = [max([len(c)] + [len(str(r[i])) for r in table]) for i, c in enumerate(columns)]
        out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
        for r in table:
            out.write("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
