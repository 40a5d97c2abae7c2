"""Directories lastlogin writes to: created private, checked before use.

A directory another user can write to (or owns) lets that user put a socket,
a symlink or a file where lastlogin writes or connects, so every directory
the daemon uses (socket, data, spool, status) goes through
``ensure_private_dir`` first: created ``0700`` (``0750`` with a group),
then checked with ``lstat`` - created just now or found at start alike.
"""

from __future__ import annotations

import grp
import os
import stat

from .config import ConfigError


class UnsafeDirectory(ConfigError):
    """A directory lastlogin would use is not private; names the setting."""

    def __init__(self, setting: str, path: str, reason: str) -> None:
        super().__init__(setting, f"{path}: {reason}")
        self.path = path


def group_id(group: str | int | None) -> int | None:
    if group is None or group == "":
        return None
    if isinstance(group, int):
        return group
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _check_ancestors(setting: str, path: str) -> None:
    """Every directory above ``path`` must be one that only root or we can
    rename things in (or sticky, like /tmp, where nobody can rename ours)."""
    parent = os.path.dirname(path)
    while True:
        st = os.stat(parent)
        if not _trusted_owner(st.st_uid):
            raise UnsafeDirectory(setting, path, f"its parent {parent} is owned by uid "
                                  f"{st.st_uid}, not root or this user")
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise UnsafeDirectory(setting, path, f"its parent {parent} is writable by "
                                  "other users")
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def check_private_dir(path: str, setting: str, group: str | int | None = None) -> None:
    """Refuse ``path`` unless it is a real directory (no symlink) that we own
    and that no one else may write to (the configured ``group`` may, when
    others may not)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeDirectory(setting, path, "does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(setting, path, "is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(setting, path, "is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(setting, path, f"is owned by uid {st.st_uid}, not by this "
                              f"user (uid {os.geteuid()})")
    if st.st_mode & stat.S_IWOTH:
        raise UnsafeDirectory(setting, path, f"is writable by other users (mode "
                              f"{stat.S_IMODE(st.st_mode):04o})")
    if st.st_mode & stat.S_IWGRP and st.st_gid != group_id(group):
        raise UnsafeDirectory(setting, path, f"is writable by group {st.st_gid} (mode "
                              f"{stat.S_IMODE(st.st_mode):04o})")
    _check_ancestors(setting, path)


def ensure_private_dir(path: str, setting: str, group: str | int | None = None) -> str:
    """Create ``path`` if missing (0700, or 0750 owned by ``group``), then
    check it (``check_private_dir``). Returns the absolute path.

    Missing parents are created 0700 too. An existing directory is not
    loosened or tightened: it is accepted or refused as it is.
    """
    if not path:
        raise ConfigError(setting, "is empty")
    path = os.path.abspath(path)
    # Resolve the parents (/var/run -> /run), never the directory itself.
    path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    gid = group_id(group)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafeDirectory(setting, path, f"cannot create: {exc.strerror}") from None
    else:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, 0o750 if gid is not None else 0o700, follow_symlinks=False)
    check_private_dir(path, setting, group)
    return path


def write_file_atomic(directory: str, name: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``directory/name`` without following a symlink anywhere in the
    way: a temporary file made with O_EXCL|O_NOFOLLOW, renamed over ``name``
    (rename replaces a symlink, it never writes through it)."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        tmp = f".{name}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dfd)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def prepare_daemon_dirs(settings) -> None:
    """Every directory `serve` writes to, made private or refused, before
    anything is opened in it: socket (and status) directory, the SQLite
    database's directory, the spool."""
    from sqlalchemy.engine import make_url
    ensure_private_dir(settings.runtime_dir(), "socket_dir", settings.socket_group or None)
    for protocol in settings.protocols:
        if getattr(settings, f"socket_{protocol}"):
            ensure_private_dir(os.path.dirname(os.path.abspath(settings.socket_path(protocol))),
                               f"socket_{protocol}", settings.socket_group or None)
    url = make_url(settings.effective_database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db_dir = os.path.dirname(os.path.abspath(url.database))
        setting = "database_url" if settings.database_url else "data_dir"
        ensure_private_dir(db_dir, setting, settings.database_group or None)
    ensure_private_dir(settings.effective_spool_dir, "spool_dir" if settings.spool_dir
                       else "data_dir")
