"""The outage spool: login records kept on local disk while the database is away.

Records are appended as checksummed lines to segment files and fsync'ed
before the login is answered, so a crash loses nothing that was
acknowledged. The rules that keep the trail exact:

- **All or nothing.** A write goes straight to the file (no buffer) and, if
  any part of it fails (ENOSPC, EIO, quota), the file is cut back to its
  last good length: a refused login never leaves bytes that replay later.
- **One owner per segment.** A process writes ``<stamp>-<pid>.open`` under
  an exclusive ``flock`` and renames it to ``.jsonl`` when it closes it
  (rotation by size and age, replay, shutdown). Only closed segments are
  replayed, each under a lock, so two processes sharing the directory
  (graceful restart) never read or delete what the other is writing. An
  ``.open`` segment whose lock is free belongs to a dead process and is
  adopted.
- **Nothing damaged is fatal.** Each line carries a CRC-32 of its record; a
  line that fails the check or does not decode, and a record the database
  rejects for its data, go to the quarantine with the reason. The rest
  replays.
- **Exactly once.** A segment is deleted only after all its records are
  committed; a crash in between replays it again, and the records' event ids
  make the second copy a no-op. Replay streams: memory stays bounded by the
  chunk size, whatever the segment size.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .db.store import LoginRecord
from .logs import show

log = logging.getLogger("lastlogin.spool")

_BYTES = ("username", "auth_mech", "master_user", "auth_user")
OPEN, CLOSED = ".open", ".jsonl"
SEGMENT_BYTES = 16 << 20        # rotate: replay never waits on one huge file
SEGMENT_SECONDS = 60.0

# A store callback: takes records, returns the ones the database rejected
# for their data, each with the reason; raises if the database is away.
Store = Callable[[list[LoginRecord]], list[tuple[LoginRecord, str]]]


class SpoolFull(Exception):
    """The spool cannot take the record: its cap is reached or the disk refused."""


class DamagedLine(ValueError):
    pass


def encode(record: LoginRecord) -> bytes:
    doc: dict[str, object] = {
        "event_id": str(record.event_id),
        "occurred_at": record.occurred_at.isoformat(),
        "protocol": record.protocol, "remote_ip": record.remote_ip,
        "local_ip": record.local_ip, "outcome": record.outcome, "rule_id": record.rule_id,
        "alerts_shown": list(record.alerts_shown),
    }
    if record.message is not None:
        doc["message"] = record.message
    if not record.policy_applied:
        doc["policy_applied"] = False
    if record.host is not None:
        doc["host"] = record.host
    for key in _BYTES:
        value = getattr(record, key)
        doc[key] = None if value is None else base64.b64encode(value).decode("ascii")
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()
    return b"%s %08x\n" % (body, zlib.crc32(body))


def decode(line: bytes) -> LoginRecord:
    """A record from one spool line; DamagedLine if it is not exactly what was written."""
    body = line.rstrip(b"\n")
    head, sep, crc = body.rpartition(b" ")
    if sep and len(crc) == 8:
        try:
            ok = int(crc, 16) == zlib.crc32(head)
        except ValueError:
            ok = False
        if not ok:
            raise DamagedLine("checksum mismatch")
        body = head
    elif not body.endswith(b"}"):
        raise DamagedLine("no checksum")
    # else: a line from before checksums; json and the fields still check it
    try:
        doc = json.loads(body)
        raw = {k: (None if doc[k] is None else base64.b64decode(doc[k], validate=True))
               for k in _BYTES}
        return LoginRecord(
            event_id=uuid.UUID(doc["event_id"]),
            occurred_at=_aware(dt.datetime.fromisoformat(doc["occurred_at"])),
            username=raw["username"] or b"", protocol=doc["protocol"],
            remote_ip=doc["remote_ip"], local_ip=doc["local_ip"], outcome=doc["outcome"],
            rule_id=doc["rule_id"], auth_mech=raw["auth_mech"],
            master_user=raw["master_user"], auth_user=raw["auth_user"],
            alerts_shown=tuple(int(a) for a in doc.get("alerts_shown", ())),
            message=doc.get("message"), policy_applied=bool(doc.get("policy_applied", True)),
            host=doc.get("host"))
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedLine(f"undecodable: {type(exc).__name__}") from None


def _aware(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("naive time")
    return value


def record_key(record: LoginRecord) -> str:
    return f"event:{record.event_id}"


class Quarantine:
    """Records set aside: never lost, never blocking the rest.

    One JSON line each, with the reason and the original spool line
    (base64), in ``quarantine.jsonl``. A record quarantined twice (a replay
    interrupted and run again) is kept once.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "quarantine.jsonl"
        self._lock = threading.Lock()
        self._keys: set[str] | None = None

    def _load_keys(self) -> set[str]:
        if self._keys is None:
            keys = set()
            for doc in self.entries():
                keys.add(doc.get("key", ""))
            self._keys = keys
        return self._keys

    def entries(self) -> Iterator[dict]:
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return
        with fh:
            for line in fh:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue

    def count(self) -> int:
        with self._lock:
            return len(self._load_keys() - {""})

    def add(self, line: bytes, reason: str, key: str | None = None) -> bool:
        """Keep ``line`` with ``reason``, fsync'ed; False if it was already there."""
        key = key or "sha256:" + hashlib.sha256(line).hexdigest()
        with self._lock:
            keys = self._load_keys()
            if key in keys:
                return False
            doc = {"at": dt.datetime.now(dt.timezone.utc).isoformat(), "key": key,
                   "reason": reason, "line": base64.b64encode(line).decode("ascii")}
            data = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
            self.dir.mkdir(mode=0o700, exist_ok=True)
            _append_all(self.path, data)
            keys.add(key)
        log.error("event=record_quarantined key=%s reason=%s file=%s",
                  key, show(reason), self.path)
        return True


def _append_all(path: Path, data: bytes) -> None:
    """Append ``data`` entirely and durably, or not at all."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        start = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Spool:
    """Append-only segments in ``directory``; bounded by ``max_bytes`` in all."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int,
                 segment_bytes: int = SEGMENT_BYTES,
                 segment_seconds: float = SEGMENT_SECONDS) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        self.quarantine = Quarantine(self.dir / "quarantine")
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._len = 0
        self._opened = 0.0
        self._size = self._disk_size()

    # --- what is there ----------------------------------------------------

    def segments(self) -> list[Path]:
        """Every segment, open or closed, oldest first."""
        return sorted([*self.dir.glob("*" + CLOSED), *self.dir.glob("*" + OPEN)],
                      key=lambda p: p.name)

    def closed_segments(self) -> list[Path]:
        return sorted(self.dir.glob("*" + CLOSED))

    def _disk_size(self) -> int:
        total = 0
        for seg in self.segments():
            with contextlib.suppress(FileNotFoundError):
                total += seg.stat().st_size
        return total

    @property
    def size(self) -> int:
        return self._size

    def depth(self) -> int:
        """Records waiting (counted by lines; cheap enough for status)."""
        total = 0
        for seg in self.segments():
            with contextlib.suppress(FileNotFoundError), open(seg, "rb") as fh:
                total += sum(1 for _ in fh)
        return total

    # --- writing -------------------------------------------------------------

    def append(self, records: Sequence[LoginRecord]) -> None:
        """Write and fsync all of ``records``, or none of them (SpoolFull)."""
        data = b"".join(encode(r) for r in records)
        with self._lock:
            if self._size + len(data) > self.max_bytes:
                raise SpoolFull(f"spool holds {self._size} bytes, limit {self.max_bytes}")
            if self._fd is not None and (
                    self._len >= self.segment_bytes
                    or time.monotonic() - self._opened > self.segment_seconds):
                self._close_locked()
            try:
                if self._fd is None:
                    self._open_locked()
                assert self._fd is not None
                _write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError as exc:
                self._undo_locked()
                raise SpoolFull(f"spool write failed: {exc.strerror or exc}") from exc
            self._len += len(data)
            self._size += len(data)

    def _open_locked(self) -> None:
        name = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%f}-{os.getpid()}{OPEN}"
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                     | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # ours while we live
            _fsync_dir(self.dir)         # the new file's name is durable too
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._fd, self._path, self._len, self._opened = fd, path, 0, time.monotonic()

    def _undo_locked(self) -> None:
        """After a failed write: cut the segment back to its last good length."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._len)
            os.fsync(self._fd)
        except OSError as exc:
            # The tail may hold part of a line: its checksum sets it aside.
            log.error("event=spool_truncate_failed segment=%s error=%s",
                      self._path, show(str(exc)))
        self._close_locked()

    def close_segment(self) -> None:
        """Close the segment being written: from now on it may be replayed."""
        with self._lock:
            self._close_locked()

    close = close_segment

    def _close_locked(self) -> None:
        if self._fd is None:
            return
        fd, path = self._fd, self._path
        self._fd = self._path = None
        assert path is not None
        try:
            if self._len == 0:
                path.unlink()
            else:
                path.rename(path.with_suffix(CLOSED))
                _fsync_dir(self.dir)
        except OSError as exc:
            log.error("event=spool_close_failed segment=%s error=%s", path, show(str(exc)))
        finally:
            os.close(fd)            # releases the lock last

    def adopt_orphans(self) -> int:
        """Close ``.open`` segments whose writer is gone (its lock is free)."""
        adopted = 0
        for path in sorted(self.dir.glob("*" + OPEN)):
            if path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue                # a live process writes it
            try:
                if os.fstat(fd).st_nlink and path.exists():
                    path.rename(path.with_suffix(CLOSED))
                    adopted += 1
                    log.info("event=spool_segment_adopted segment=%s", path.name)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        return adopted

    # --- replay ---------------------------------------------------------------

    def replay(self, store: Store, chunk: int = 1000) -> int:
        """Store every closed segment, oldest first; the number of records handled.

        Raises whatever ``store`` raises when the database is away: the
        segment stays, and the next call takes it again.
        """
        done = 0
        for segment in self.closed_segments():
            done += self._replay_segment(segment, store, chunk)
        self._size = self._disk_size()
        return done

    def _replay_segment(self, segment: Path, store: Store, chunk: int) -> int:
        try:
            fh = open(segment, "rb")
        except FileNotFoundError:
            return 0                    # another replayer took it
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0                # another replayer is at it
            if os.fstat(fh.fileno()).st_nlink == 0:
                return 0                # finished and removed meanwhile
            stored = quarantined = 0
            batch: list[LoginRecord] = []
            for lineno, line in enumerate(fh, 1):
                rec = self._checked(segment, lineno, line)
                if rec is None:
                    quarantined += 1
                    continue
                batch.append(rec)
                if len(batch) >= chunk:
                    stored, quarantined = self._store(batch, store, stored, quarantined)
                    batch = []
            if batch:
                stored, quarantined = self._store(batch, store, stored, quarantined)
            segment.unlink()
        log.info("event=spool_replayed segment=%s records=%d quarantined=%d",
                 segment.name, stored, quarantined)
        return stored + quarantined

    def _checked(self, segment: Path, lineno: int, line: bytes) -> LoginRecord | None:
        where = f"{segment.name} line {lineno}"
        if not line.endswith(b"\n"):
            # Cut off by a crash in the middle of a write: never acknowledged.
            self.quarantine.add(line, f"{where}: incomplete line (never acknowledged)")
            return None
        try:
            return decode(line)
        except DamagedLine as exc:
            self.quarantine.add(line, f"{where}: damaged ({exc})")
            return None

    def _store(self, batch: list[LoginRecord], store: Store, stored: int,
               quarantined: int) -> tuple[int, int]:
        rejected = store(batch)
        for rec, reason in rejected:
            self.quarantine.add(encode(rec), f"rejected by the database: {reason}",
                                record_key(rec))
        return stored + len(batch) - len(rejected), quarantined + len(rejected)
