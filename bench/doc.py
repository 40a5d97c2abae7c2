"""Write one benchmark's table into docs/performance.md, between its markers."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def write_section(name: str, heading: str, lines: list[str], doc: Path = DOC) -> None:
    """Replace what stands between <!-- NAME:BEGIN --> and <!-- NAME:END -->
    in ``doc`` (or add the section under ``heading``), and print it."""
    begin, end = f"<!-- {name}:BEGIN -->", f"<!-- {name}:END -->"
    body = "\n".join([begin, *lines, end])
    text = doc.read_text() if doc.exists() else "# Performance\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text += f"\n## {heading}\n\n{body}\n"
    doc.write_text(text)
    print(body)
