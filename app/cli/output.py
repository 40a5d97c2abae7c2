"""One --format option for every listing command: table, csv or json."""

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


def cell(value: Any, fmt: str) -> Any:
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
        json.dump([dict(zip(columns, r)) for r in table], out, ensure_ascii=False, indent=1)
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
