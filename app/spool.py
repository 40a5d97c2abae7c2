"""The outage spool: login records kept on local disk while the database is away.

Records are appended as checksummed lines to segment files and fsync'ed
before the login is answered, so a crash loses nothing that was
acknowledged. The rules that keep the trail exact:

- **All or nothing.** A write goes straight to the file (no buffer) and, if
  any part of it fails (ENOSPC, EIO, quota), the file is cut back to its
  last good length: a refused login never leaves bytes that replay later.
- **One owner per segment.** A process creates ``<stamp>-<pid>.new``, takes
  an exclusive ``flock`` on it and only then names it ``.open``; it renames
  it ``.closed`` when it closes it (rotation by size and age, replay,
  shutdown). Only closed segments are replayed, each under a lock, so two
  processes sharing the directory (graceful restart) never read or delete
  what the other is writing. An ``.open`` segment whose lock is free
  belongs to a dead process and is adopted.
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
import ipaddress
import json
import logging
import os
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .login import OUTCOMES, PROTOCOLS, LoginRecord
from .logs import show


log = logging.getLogger("lastlogin.spool")

_BYTES = ("username", "auth_mech", "master_user", "auth_user")
NEW, OPEN, CLOSED = ".new", ".open", ".closed"
LEGACY = ".jsonl"           # closed or open: written by a release before .open/.closed
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
    if record.country is not None:
        doc["country"] = record.country
    if record.asn is not None:
        doc["asn"] = record.asn
    if record.session_id is not None:
        doc["session_id"] = record.session_id
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
    # else: a line from before checksums; the field checks below still apply
    try:
        return _record_of(json.loads(body))
    except DamagedLine:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever is wrong, it is damaged
        raise DamagedLine(f"undecodable: {type(exc).__name__}") from None


def _record_of(doc: dict) -> LoginRecord:
    """Every field checked for type and value: a line that decodes is storable."""
    if not isinstance(doc, dict):
        raise DamagedLine("not an object")
    raw = {k: _opt_b64(doc[k]) for k in _BYTES}
    protocol, outcome = doc["protocol"], doc["outcome"]
    if protocol not in PROTOCOLS or outcome not in OUTCOMES:
        raise DamagedLine("unknown protocol or outcome")
    rule_id, message = doc["rule_id"], doc.get("message")
    if rule_id is not None and type(rule_id) is not int:
        raise DamagedLine("rule_id is not an integer")
    if message is not None and not isinstance(message, str):
        raise DamagedLine("message is not text")
    applied = doc.get("policy_applied", True)
    alerts = doc.get("alerts_shown", [])
    if type(applied) is not bool or not isinstance(alerts, list) or any(
            type(a) is not int for a in alerts):
        raise DamagedLine("policy_applied or alerts_shown malformed")
    if not isinstance(doc["event_id"], str) or not isinstance(doc["occurred_at"], str):
        raise DamagedLine("event_id or occurred_at malformed")
    host = doc.get("host")
    if host is not None and not isinstance(host, str):
        raise DamagedLine("host is not text")
    country, asn = doc.get("country"), doc.get("asn")
    if country is not None and not (isinstance(country, str) and len(country) == 2):
        raise DamagedLine("country is not a two-letter code")
    if asn is not None and type(asn) is not int:
        raise DamagedLine("asn is not an integer")
    session_id = doc.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        raise DamagedLine("session_id is not text")
    return LoginRecord(
        event_id=uuid.UUID(doc["event_id"]),
        occurred_at=_aware(dt.datetime.fromisoformat(doc["occurred_at"])),
        username=raw["username"] or b"", protocol=protocol,
        remote_ip=_address(doc["remote_ip"]), local_ip=_address(doc["local_ip"]),
        outcome=outcome, rule_id=rule_id, auth_mech=raw["auth_mech"],
        master_user=raw["master_user"], auth_user=raw["auth_user"],
        alerts_shown=tuple(alerts), message=message, policy_applied=applied, host=host,
        country=country, asn=asn, session_id=session_id)


def _opt_b64(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DamagedLine("bytes field is not base64 text")
    return base64.b64decode(value, validate=True)


def _address(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DamagedLine("address is not text")
    return str(ipaddress.ip_address(value))


def _aware(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("naive time")
    return value


def record_key(record: LoginRecord) -> str:
    return f"event:{record.event_id}"


class QuarantineFull(OSError):
    pass


class Quarantine:
    """Records set aside: never lost, never blocking the rest.

    One JSON line each, with the reason and the original spool line
    (base64), in ``quarantine.jsonl``. Appends happen under an exclusive
    flock, so two processes sharing the directory (a graceful restart)
    neither cut each other's lines nor keep one record twice: before each
    append the lines other processes added are read. Bounded by
    ``max_bytes``; past it ``add`` raises QuarantineFull and the caller
    follows ``spool_full_action``.
    """

    def __init__(self, directory: Path, max_bytes: int = 64 << 20) -> None:
        self.dir = directory
        self.path = directory / "quarantine.jsonl"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self._read_upto = 0
        with self._lock:
            self._catch_up(None)

    def entries(self) -> Iterator[dict]:
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return
        with fh:
            yield from _json_lines(fh)

    def count(self) -> int:
        """Records set aside (by every process), as of the last look at the file."""
        with self._lock:
            self._catch_up(None)
            return len(self._keys)

    def _catch_up(self, fd: int | None) -> None:
        """Learn the keys of lines appended since we last looked."""
        try:
            fh = os.fdopen(os.dup(fd), "rb") if fd is not None else open(self.path, "rb")
        except FileNotFoundError:
            return
        with fh:
            if os.fstat(fh.fileno()).st_size < self._read_upto:
                self._keys.clear()          # moved away and begun anew
                self._read_upto = 0
            fh.seek(self._read_upto)
            pos = self._read_upto
            for line in _lines(fh):
                if not line.endswith(b"\n"):
                    break           # not whole yet: read again next time
                pos += len(line)
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict) and doc.get("key"):
                    self._keys.add(doc["key"])
            self._read_upto = pos

    def add(self, line: bytes, reason: str, key: str | None = None) -> bool:
        """Keep ``line`` with ``reason``, fsync'ed; False if it was already there."""
        key = key or "sha256:" + hashlib.sha256(line).hexdigest()
        doc = {"at": dt.datetime.now(dt.timezone.utc).isoformat(), "key": key,
               "reason": reason, "line": base64.b64encode(line).decode("ascii")}
        data = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            if key in self._keys:
                return False
            created = not self.dir.exists()
            self.dir.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._catch_up(fd)
                if key in self._keys:
                    return False
                start = os.fstat(fd).st_size
                if start + len(data) > self.max_bytes:
                    raise QuarantineFull(f"quarantine holds {start} bytes, "
                                         f"limit {self.max_bytes}")
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)     # under the lock: only our bytes
                    raise
                self._keys.add(key)
                self._read_upto = start + len(data)
            finally:
                os.close(fd)
            if created or start == 0:
                _fsync_dir(self.dir)
                _fsync_dir(self.dir.parent)
        log.error("event=record_quarantined key=%s reason=%s file=%s",
                  key, show(reason), self.path)
        return True


MAX_LINE = 1 << 20      # far above any record; a longer "line" is damage


def _lines(fh) -> Iterator[bytes]:
    """Lines of at most MAX_LINE bytes; a longer run is cut into pieces that
    fail their check, so memory stays bounded whatever is on disk."""
    while line := fh.readline(MAX_LINE):
        yield line


def _json_lines(fh) -> Iterator[object]:
    for line in _lines(fh):
        if not line.endswith(b"\n"):
            break                   # being written, or torn: not an entry
        try:
            yield json.loads(line)
        except ValueError:
            continue


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _writer_pid(path: Path) -> int | None:
    tail = path.stem.rpartition("-")[2]
    return int(tail) if tail.isdigit() else None


class Spool:
    """Append-only segments in ``directory``; bounded by ``max_bytes`` in all.

    A segment's life: ``X.new`` (created and locked under a name nobody
    looks at), ``X.open`` (being written, locked), ``X.closed`` (complete:
    any replayer may take it, under its lock), deleted once stored.
    ``X.jsonl`` is a segment of a release before this one: closed once its
    writer's pid is gone.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int,
                 segment_bytes: int = SEGMENT_BYTES,
                 segment_seconds: float = SEGMENT_SECONDS,
                 quarantine_max_bytes: int = 64 << 20) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        self.quarantine = Quarantine(self.dir / "quarantine", quarantine_max_bytes)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._len = 0
        self._opened = 0.0
        self.errors: dict[str, str] = {}     # segment name -> why it cannot be replayed
        self._size = self._disk_size()

    # --- what is there ----------------------------------------------------

    def segments(self) -> list[Path]:
        """Every segment with records, open or closed, oldest first."""
        found = [p for suffix in (CLOSED, OPEN, LEGACY) for p in self.dir.glob("*" + suffix)]
        return sorted((p for p in found if p.is_file()), key=lambda p: p.name)

    def closed_segments(self) -> list[Path]:
        """Segments nobody writes any more, oldest first."""
        legacy = [p for p in self.dir.glob("*" + LEGACY)
                  if not (pid := _writer_pid(p)) or pid == os.getpid() or not _pid_alive(pid)]
        return sorted([*self.dir.glob("*" + CLOSED), *legacy], key=lambda p: p.name)

    def _disk_size(self) -> int:
        total = 0
        for seg in self.segments():
            with contextlib.suppress(OSError):
                total += seg.stat().st_size
        return total

    @property
    def size(self) -> int:
        return self._size

    def depth(self) -> int:
        """Records waiting (counted by lines; cheap enough for status)."""
        total = 0
        for seg in self.segments():
            with contextlib.suppress(OSError), open(seg, "rb") as fh:
                total += sum(1 for _ in _lines(fh))
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
        stem = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%f}-{os.getpid()}"
        new, path = self.dir / (stem + NEW), self.dir / (stem + OPEN)
        # Locked before it has a name any replayer looks for.
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                     | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # ours while we live
            new.rename(path)
            _fsync_dir(self.dir)         # the name is durable too
        except OSError:
            os.close(fd)
            for leftover in (new, path):
                with contextlib.suppress(OSError):
                    leftover.unlink()
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
        """Close ``.open`` segments whose writer is gone (its lock is free) and
        remove ``.new`` files a writer died before naming."""
        adopted = 0
        # A .new file is locked only after it is made: take it only when its
        # writer is gone, never while one may be between open and flock.
        stale = [p for p in self.dir.glob("*" + NEW)
                 if (pid := _writer_pid(p)) and pid != os.getpid() and not _pid_alive(pid)]
        for path in sorted([*self.dir.glob("*" + OPEN), *stale]):
            if path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Still the same file under that name, and still ours to take?
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    continue
                if path.suffix == NEW or os.fstat(fd).st_size == 0:
                    path.unlink()
                else:
                    path.rename(path.with_suffix(CLOSED))
                    adopted += 1
                    log.info("event=spool_segment_adopted segment=%s", path.name)
            except OSError:
                continue                # locked (a live writer) or gone
            finally:
                os.close(fd)
        return adopted

    # --- replay ---------------------------------------------------------------

    def replay(self, store: Store, chunk: int = 1000) -> int:
        """Store every closed segment, oldest first; the number of records handled.

        Raises whatever ``store`` raises when the database is away: the
        segment stays, and the next call takes it again. A segment that
        cannot be read or removed (a file-system error) is skipped and named
        in ``errors``; the others go on.
        """
        done = 0
        for segment in self.closed_segments():
            try:
                done += self._replay_segment(segment, store, chunk)
                self.errors.pop(segment.name, None)
            except OSError as exc:
                why = f"{exc.strerror or exc}"
                if self.errors.get(segment.name) != why:
                    log.error("event=spool_segment_unreadable segment=%s error=%s",
                              segment.name, show(why))
                self.errors[segment.name] = why
        size = self._disk_size()
        with self._lock:
            self._size = size
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
            for lineno, line in enumerate(_lines(fh), 1):
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
            # Cut off by a crash in the middle of a write (never acknowledged),
            # or a run of bytes longer than any record.
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
