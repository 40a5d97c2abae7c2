"""Where a client address is: country and ASN from local MaxMind-format files.

Read with ``maxminddb`` (memory-mapped, C extension): no network, a few
microseconds per lookup (bench/geoip.py). The files are whatever
``geoipupdate`` or the operator puts there -- GeoLite2/GeoIP2 Country or
City, GeoLite2 ASN, DB-IP lite. ``geoipupdate`` replaces a file by renaming a
new one over it, so the reader checks the file's inode and mtime (at most
once every ``CHECK_EVERY`` seconds, never per login) and reopens it; SIGHUP
reopens it too. A file that cannot be opened at start is a ``GeoIPError``
(one line); one that breaks later keeps the reader that was open.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import maxminddb

from .logs import show

log = logging.getLogger("lastlogin.geoip")

CHECK_EVERY = 5.0           # seconds between stat() calls of a file

__all__ = ["GeoIP", "GeoIPError", "Place", "CHECK_EVERY"]


class GeoIPError(Exception):
    """A configured database cannot be opened (one line, naming the file)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Place:
    """Where a login came from; None where a database does not know."""

    country: str | None = None
    asn: int | None = None


NOWHERE = Place()


class _Db:
    """One memory-mapped database, reopened when its file is replaced."""

    def __init__(self, key: str, path: str) -> None:
        self.key = key
        self.path = path
        self.reader, self.ident = self._open()
        self.checked = time.monotonic()
        self._lock = threading.Lock()

    def _open(self):
        try:
            st = os.stat(self.path)
            # MODE_MMAP_EXT: the C reader over a memory map (MODE_MMAP is the
            # pure-Python one, ~100x slower per lookup).
            reader = maxminddb.open_database(self.path, maxminddb.MODE_MMAP_EXT)
        except FileNotFoundError:
            raise GeoIPError(self.key, f"no such file: {self.path}") from None
        except PermissionError:
            raise GeoIPError(self.key, f"cannot read {self.path}: permission denied") from None
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoIPError(self.key, f"{self.path} is not a MaxMind database: "
                                       f"{str(exc).splitlines()[0] if str(exc) else exc!r}"
                             ) from None
        return reader, (st.st_ino, st.st_mtime_ns, st.st_size)

    @property
    def kind(self) -> str:
        return str(self.reader.metadata().database_type)

    def reopen(self, why: str) -> bool:
        """Open the file again; the old reader stays when the new one fails."""
        with self._lock:
            try:
                reader, ident = self._open()
            except GeoIPError as exc:
                log.error("event=geoip_reopen_failed key=%s reason=%s", self.key,
                          show(exc.reason))
                return False
            old, self.reader, self.ident = self.reader, reader, ident
        log.info("event=geoip_reopened key=%s why=%s type=%s", self.key, why, show(self.kind))
        # The old map stays valid for lookups still using it; the GC closes it.
        del old
        return True

    def maybe_reopen(self, now: float) -> None:
        if now - self.checked < CHECK_EVERY:
            return
        self.checked = now
        try:
            st = os.stat(self.path)
        except OSError:
            return                  # being replaced; the next check sees the new one
        if (st.st_ino, st.st_mtime_ns, st.st_size) != self.ident:
            self.reopen("file changed")

    def get(self, addr: str):
        try:
            return self.reader.get(addr)
        except (ValueError, maxminddb.InvalidDatabaseError):
            return None


def _country(rec) -> str | None:
    if not isinstance(rec, dict):
        return None
    for key in ("country", "registered_country"):
        part = rec.get(key)
        if isinstance(part, dict):
            code = part.get("iso_code")
            if isinstance(code, str) and len(code) == 2 and code.isascii() and code.isalpha():
                return code.upper()
    return None


def _asn(rec) -> int | None:
    if not isinstance(rec, dict):
        return None
    n = rec.get("autonomous_system_number")
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**32 else None


class GeoIP:
    """Country and ASN of an address, from the databases the settings name."""

    def __init__(self, country_db: str = "", asn_db: str = "") -> None:
        self.country = _Db("geoip_country_db", country_db) if country_db else None
        self.asn = _Db("geoip_asn_db", asn_db) if asn_db else None

    @classmethod
    def from_settings(cls, settings) -> "GeoIP | None":
        """None when no database is configured; GeoIPError when one cannot be read."""
        if not (settings.geoip_country_db or settings.geoip_asn_db):
            return None
        return cls(settings.geoip_country_db, settings.geoip_asn_db)

    def lookup(self, addr: str | None) -> Place:
        """The place of ``addr`` (canonical text, as login.normalize_ip gives)."""
        if not addr:
            return NOWHERE
        now = time.monotonic()
        country = asn = None
        if self.country is not None:
            self.country.maybe_reopen(now)
            country = _country(self.country.get(addr))
        if self.asn is not None:
            self.asn.maybe_reopen(now)
            rec = self.asn.get(addr)
            asn = _asn(rec)
            if country is None and self.country is None:
                country = _country(rec)     # a combined database (DB-IP, IPinfo)
        return Place(country, asn)

    def reopen(self) -> None:
        """SIGHUP: open both files again."""
        for db in (self.country, self.asn):
            if db is not None:
                db.reopen("reload")

    def describe(self) -> str:
        """For `status` and the start log line: what is loaded."""
        parts = []
        for db in (self.country, self.asn):
            if db is not None:
                meta = db.reader.metadata()
                built = time.strftime("%Y-%m-%d", time.gmtime(meta.build_epoch))
                parts.append(f"{db.key}={db.path} ({meta.database_type}, built {built})")
        return "; ".join(parts)
