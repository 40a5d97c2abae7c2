"""The daemon's state, as one typed object: written by the daemon, read by
`lastlogin status` and the metrics endpoint.

The daemon rewrites ``<runtime dir>/status.json`` every two seconds from a
``DaemonStatus``; `lastlogin status` reads it back with ``read_status``.
Unknown keys (a newer daemon) are ignored, missing ones take their default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

STATUS_FILE = "status.json"
STATUS_MAX_AGE = 15.0       # the daemon rewrites its status file every 2 s


@dataclass
class DaemonStatus:
    pid: int = 0
    written_at: float = 0.0
    inflight: int = 0
    database_down: bool = False
    config_version: int | None = None
    rules: int | None = None
    config_checked_age: float | None = None     # seconds since the rules were confirmed
    spool_bytes: int = 0
    committed: int = 0
    spooled: int = 0
    dropped: int = 0
    quarantined: int = 0
    database_errors: int = 0
    refusing: str | None = None         # logins refused: the spool cannot take records
    unrecorded: str | None = None       # logins allowed unrecorded: the same, "allow"
    config_skipped: list[list] = field(default_factory=list)   # [table, id, reason]
    config_load_error: str | None = None
    database: str = ""                  # the daemon's database URL, password hidden
    unloaded_action: str = "allow"      # its rules_unloaded_action
    new_locations: int = 0              # logins flagged new_location since start
    notify_failed: int = 0              # notify_command runs that failed or were dropped
    geoip: str = ""                     # the GeoIP databases loaded ("": none)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_doc(cls, doc: dict) -> "DaemonStatus":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


def status_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, STATUS_FILE)


def read_status(runtime_dir: str) -> DaemonStatus | None:
    """The running daemon's status; None if there is none that is current."""
    try:
        with open(status_path(runtime_dir)) as fh:
            doc = json.load(fh)
        state = DaemonStatus.from_doc(doc)
    except (OSError, ValueError, TypeError):
        return None
    if time.time() - state.written_at > STATUS_MAX_AGE:
        return None
    try:
        os.kill(int(state.pid), 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return None
    except PermissionError:
        pass                        # alive, run by another user
    return state


def remove_own_status(runtime_dir: str) -> None:
    """Remove status.json if this process wrote it (after a hand-over the
    successor's is there, and `lastlogin status` must keep seeing it)."""
    path = status_path(runtime_dir)
    try:
        with open(path) as fh:
            pid = json.load(fh).get("pid")
        if pid == os.getpid():
            os.unlink(path)
    except (OSError, ValueError, AttributeError):
        pass
