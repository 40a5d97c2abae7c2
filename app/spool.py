"""The outage spool: login records kept on local disk while the database is away.

Records are appended as JSON lines to segment files and fsync'ed before the
login is answered, so a crash loses nothing that was acknowledged. The
replayer stores closed segments in order and deletes a segment only after
its records are committed; a crash in between replays that segment again,
and the records' event ids make the second copy a no-op (exactly once).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Iterator

from .db.store import LoginRecord

log = logging.getLogger("lastlogin.spool")

_BYTES = ("username", "auth_mech", "master_user", "auth_user")


class SpoolFull(Exception):
    pass


def encode(record: LoginRecord) -> bytes:
    doc: dict[str, object] = {
        "event_id": str(record.event_id),
        "occurred_at": record.occurred_at.isoformat(),
        "protocol": record.protocol, "remote_ip": record.remote_ip,
        "local_ip": record.local_ip, "outcome": record.outcome, "rule_id": record.rule_id,
        "alerts_shown": list(record.alerts_shown),
    }
    for key in _BYTES:
        value = getattr(record, key)
        doc[key] = None if value is None else base64.b64encode(value).decode("ascii")
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> LoginRecord:
    doc = json.loads(line)
    raw = {k: (None if doc[k] is None else base64.b64decode(doc[k])) for k in _BYTES}
    return LoginRecord(
        event_id=uuid.UUID(doc["event_id"]),
        occurred_at=dt.datetime.fromisoformat(doc["occurred_at"]),
        username=raw["username"] or b"", protocol=doc["protocol"],
        remote_ip=doc["remote_ip"], local_ip=doc["local_ip"], outcome=doc["outcome"],
        rule_id=doc["rule_id"], auth_mech=raw["auth_mech"], master_user=raw["master_user"],
        auth_user=raw["auth_user"], alerts_shown=tuple(doc.get("alerts_shown", ())))


class Spool:
    """Append-only segments in ``directory``; bounded by ``max_bytes`` in all."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fh = None
        self._current: Path | None = None
        self._size = sum(p.stat().st_size for p in self.segments())

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("*.jsonl"))

    @property
    def size(self) -> int:
        return self._size

    def depth(self) -> int:
        """Records waiting (counted by lines; cheap enough for status)."""
        total = 0
        for seg in self.segments():
            with open(seg, "rb") as fh:
                total += sum(1 for _ in fh)
        return total

    def append(self, records: list[LoginRecord]) -> None:
        """Write and fsync; raises SpoolFull when the bound would be passed."""
        data = b"".join(encode(r) for r in records)
        with self._lock:
            if self._size + len(data) > self.max_bytes:
                raise SpoolFull(f"spool holds {self._size} bytes, limit {self.max_bytes}")
            if self._fh is None:
                self._open_segment()
            self._fh.write(data)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._size += len(data)

    def _open_segment(self) -> None:
        name = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%f}-{os.getpid()}.jsonl"
        self._current = self.dir / name
        self._fh = open(self._current, "ab")
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)           # the new file's name is durable too
        finally:
            os.close(dfd)

    def close_segment(self) -> None:
        """Start a new segment on the next append; the current one may be replayed."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
                self._current = None

    def closed_segments(self) -> list[Path]:
        with self._lock:
            return [s for s in self.segments() if s != self._current]

    @staticmethod
    def read(segment: Path) -> Iterator[LoginRecord]:
        with open(segment, "rb") as fh:
            for line in fh:
                if line.endswith(b"\n"):        # a torn last line was never acknowledged
                    yield decode(line)

    def remove(self, segment: Path) -> None:
        with self._lock:
            self._size -= segment.stat().st_size
            segment.unlink()
