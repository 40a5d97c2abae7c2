"""Listening sockets: bind, inherit (systemd, a predecessor), hand over.

Everything about the sockets Dovecot connects to, and nothing about what is
said on them (app/server.py). A stale socket file is replaced atomically; a
socket inherited from systemd stays systemd's; on a graceful restart
(SIGUSR2) the same sockets are handed to a successor process, which says
READY=1 before this one steps down, so no login is refused meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import subprocess
from dataclasses import dataclass

from .config import Settings
from .safedirs import ensure_private_dir

log = logging.getLogger("lastlogin.sockets")

# --- listening sockets ----------------------------------------------------

class SocketInUse(Exception):
    pass


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _owner_ids(settings: Settings) -> tuple[int, int]:
    import grp
    import pwd
    uid = gid = -1
    if settings.socket_owner:
        o = settings.socket_owner
        uid = int(o) if o.isdigit() else pwd.getpwnam(o).pw_uid
    if settings.socket_group:
        g = settings.socket_group
        gid = int(g) if g.isdigit() else grp.getgrnam(g).gr_gid
    return uid, gid


@dataclass
class Listener:
    protocol: str
    path: str
    sock: socket.socket
    inode: int          # of the socket file, to unlink only our own
    owned: bool = True  # False: systemd's (socket activation) or handed to a successor

    def close(self) -> None:
        """Unlink the path only if it is still our socket (not a successor's)."""
        try:
            if self.owned and os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass
        self.sock.close()


SD_LISTEN_FDS_START = 3
HANDOVER_ENV = "LASTLOGIN_HANDOVER_FDS"
HANDOVER_NOTIFY_ENV = "LASTLOGIN_HANDOVER_NOTIFY"

# The successor's start: an isolated interpreter (-I: no current or script
# directory on sys.path, no PYTHON* variables, no user site) that imports
# lastlogin from where this process imported it, and nothing else first.
_SUCCESSOR_BOOT = (
    "import sys\n"
    "root = sys.argv.pop(1)\n"
    "if root not in sys.path: sys.path.insert(0, root)\n"
    "from app.cli import main\n"
    "sys.argv[0] = 'lastlogin'\n"
    "main()\n")


def successor_command(config_path: str | None) -> list[str]:
    """`lastlogin serve` as this very installation, safe to run in any cwd."""
    import sys

    import app
    root = os.path.dirname(os.path.dirname(os.path.abspath(app.__file__)))
    args = [sys.executable, "-I", "-c", _SUCCESSOR_BOOT, root]
    if config_path:
        args += ["--config", os.path.abspath(config_path)]
    return args + ["serve"]


def inherited_sockets() -> list[tuple[socket.socket, str | None, bool]]:
    """Listening sockets handed to us: (socket, its path if known, owned).

    systemd socket activation (LISTEN_FDS/LISTEN_PID; the path is the
    socket's own name and stays systemd's), or a predecessor's graceful
    restart (LASTLOGIN_HANDOVER_FDS="path=fd,..."; the paths become ours).
    The variables are removed so that children do not see them.
    """
    found: list[tuple[int, str | None, bool]] = []
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        count = int(os.environ.get("LISTEN_FDS", "0") or 0)
        found += [(fd, None, False)
                  for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)]
    for item in filter(None, os.environ.get(HANDOVER_ENV, "").split(",")):
        # path=fd:owned -- 0 for a socket that stays systemd's (a predecessor
        # that was socket-activated). A bare path=fd comes from a release
        # that did not say: not ours to unlink (at worst a stale file stays,
        # which the next start replaces).
        path, _, handed = item.rpartition("=")
        fd, _, owned = handed.partition(":")
        if fd.isdigit():
            found.append((int(fd), path, owned == "1"))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", HANDOVER_ENV):
        os.environ.pop(var, None)
    out = []
    for fd, path, owned in found:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        out.append((sock, path, owned))
    return out


def bind_listener(protocol: str, path: str, settings: Settings) -> Listener:
    """Bind ``path`` with the configured mode and owner.

    Its directory is made private (or checked) first: whoever can write
    there could put their own socket at ``path``. A stale socket file
    (nobody answers) is replaced atomically: the new socket is bound under a
    temporary name and renamed over it, so there is never a moment without
    a socket at ``path``. A live one is left alone.
    """
    setting = f"socket_{protocol}" if getattr(settings, f"socket_{protocol}") else "socket_dir"
    ensure_private_dir(os.path.dirname(os.path.abspath(path)), setting,
                       settings.socket_group or None)
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SocketInUse(f"{path} exists and is not a socket")
        if _answers(path):
            raise SocketInUse(f"{path} is in use by another process")
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~settings.socket_mode)
    try:
        sock.bind(tmp)
    finally:
        os.umask(old_umask)
    os.chmod(tmp, settings.socket_mode)
    uid, gid = _owner_ids(settings)
    if uid != -1 or gid != -1:
        os.chown(tmp, uid, gid)
    sock.listen(settings.socket_backlog)
    inode = os.stat(tmp).st_ino
    os.rename(tmp, path)
    sock.setblocking(False)
    return Listener(protocol, path, sock, inode)


def take_listeners(settings: Settings) -> list[Listener]:
    """Take over inherited sockets by their path; bind the others."""
    ensure_private_dir(settings.runtime_dir(), "socket_dir", settings.socket_group or None)
    inherited = {}
    for sock, name, owned in inherited_sockets():
        if name is None:
            try:
                name = sock.getsockname()
            except OSError:
                name = None
        if isinstance(name, str) and name:
            inherited[os.path.abspath(name)] = (sock, owned)
        else:
            log.warning("event=inherited_fd_ignored fd=%d", sock.fileno())
            sock.close()
    listeners: list[Listener] = []
    try:
        for proto in settings.protocols:
            path = settings.socket_path(proto)
            found = inherited.pop(os.path.abspath(path), None)
            if found:
                sock, owned = found
                listeners.append(Listener(proto, path, sock, os.stat(path).st_ino, owned))
                log.info("event=socket_inherited protocol=%s socket=%s", proto, path)
            else:
                listeners.append(bind_listener(proto, path, settings))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    for path, (sock, _) in inherited.items():
        log.warning("event=inherited_socket_unused socket=%s", path)
        sock.close()
    return listeners


def handover_value(listeners: list[Listener]) -> str:
    """LASTLOGIN_HANDOVER_FDS for a successor: path=fd:owned for each socket.

    A socket that is systemd's (socket activation) stays systemd's in the
    successor too: it must never unlink the path systemd keeps listening on.
    """
    return ",".join(f"{lst.path}={lst.sock.fileno()}:{int(lst.owned)}" for lst in listeners)


async def hand_over(listeners: list[Listener], runtime_dir: str, config_path: str | None,
                    ready_timeout: float = 30.0) -> int | None:
    """Start a successor on ``listeners``; its pid once it said READY=1, else None.

    The successor inherits the sockets (LASTLOGIN_HANDOVER_FDS) and says
    READY=1 on a private notify socket. If it never does, it is terminated
    and this process goes on serving. On success the listeners are no
    longer ours to unlink, and systemd (NotifyAccess=main) is told the
    successor is the service's main process.
    """
    loop = asyncio.get_running_loop()
    fds = [lst.sock.fileno() for lst in listeners]
    handed = handover_value(listeners)
    notify_path = os.path.join(runtime_dir, f".handover-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(notify_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    notify.bind(notify_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path,
               **{HANDOVER_ENV: handed,
                  HANDOVER_NOTIFY_ENV: os.environ.get("NOTIFY_SOCKET", "")})
    try:
        child = subprocess.Popen(successor_command(config_path), env=env, pass_fds=fds,
                                 cwd="/")
        log.info("event=handover_started child_pid=%d", child.pid)
        try:
            async with asyncio.timeout(ready_timeout):
                while not (await loop.sock_recv(notify, 4096)).startswith(b"READY=1"):
                    pass
        except TimeoutError:
            log.error("event=handover_failed child_pid=%d reason=not_ready", child.pid)
            child.terminate()
            await loop.run_in_executor(None, child.wait)
            return None
    finally:
        notify.close()
        with contextlib.suppress(OSError):
            os.unlink(notify_path)
    for lst in listeners:
        lst.owned = False           # the successor unlinks them when it is done
    sd_notify(f"MAINPID={child.pid}")
    os.environ.pop("NOTIFY_SOCKET", None)   # no longer the service's process
    log.info("event=handover_done child_pid=%d", child.pid)
    return child.pid


def notify_ready() -> None:
    """READY=1 -- and, in a successor, systemd's socket back from now on."""
    sd_notify("READY=1\nSTATUS=serving")
    if HANDOVER_NOTIFY_ENV in os.environ:
        # A successor told its predecessor (above); from now on systemd's
        # socket, now that the predecessor made us its MAINPID.
        restore = os.environ.pop(HANDOVER_NOTIFY_ENV)
        if restore:
            os.environ["NOTIFY_SOCKET"] = restore
        else:
            os.environ.pop("NOTIFY_SOCKET", None)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(target)
            s.sendall(message.encode())
        except OSError as exc:
            log.warning("event=sd_notify_failed error=%s", exc)
