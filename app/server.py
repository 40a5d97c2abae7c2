"""Sockets, fd passing, timeouts, signals, drain.

One asyncio loop serves every protocol socket. A connection is one login:
read the request (recvmsg, so the client fd is never dropped), let the
service decide and record, answer, and close our copy of the client fd on
every path. A bad connection costs one log line and ends without a reply,
which Dovecot treats as a refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass

from .config import Settings, load_settings, ConfigError
from .logs import Shown, show
from .safedirs import ensure_private_dir, write_file_atomic
from .fdio import PeerError, close_all, read_message, send_all, write_fd
from .protocol import ProtocolError, LoginRequest, parse_request, request_complete
from .service import Answer, Extras, LoginService, RecordError

log = logging.getLogger("lastlogin.server")

_PEERCRED = struct.Struct("3i")
INLINE_PARSE_BYTES = 16 << 10       # real requests are a few hundred bytes


class ConnectionRefused(Exception):
    """A connection that ends without a reply; the text is logged."""


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid}"


def peer_of(conn: socket.socket) -> Peer:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return Peer(*_PEERCRED.unpack(raw))


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
        path, _, fd = item.rpartition("=")
        if fd.isdigit():
            found.append((int(fd), path, True))
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


@dataclass
class ClientFd:
    """The client connection Dovecot passed us (we only ever write to it)."""

    fd: int
    timeout: float

    async def write(self, data: bytes) -> None:
        await write_fd(self.fd, data, self.timeout)


# --- the server -------------------------------------------------------------

class Server:
    """Lifecycle: start (bind, notify ready), serve until asked, drain, stop."""

    def __init__(self, settings: Settings, service: LoginService,
                 config_path: str | None = None) -> None:
        self.settings = settings
        self.service = service
        self.config_path = config_path
        self._allowed_uids = settings.resolved_uids()
        self.listeners: list[Listener] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._slots: asyncio.Semaphore | None = None
        self._limit_logged_at = -1e9

    # lifecycle
    def bind(self) -> None:
        """Take over inherited sockets by their path; bind the others."""
        ensure_private_dir(self.settings.runtime_dir(), "socket_dir",
                           self.settings.socket_group or None)
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
        try:
            for proto in self.settings.protocols:
                path = self.settings.socket_path(proto)
                found = inherited.pop(os.path.abspath(path), None)
                if found:
                    sock, owned = found
                    self.listeners.append(Listener(proto, path, sock, os.stat(path).st_ino, owned))
                    log.info("event=socket_inherited protocol=%s socket=%s", proto, path)
                else:
                    self.listeners.append(bind_listener(proto, path, self.settings))
        except BaseException:
            self.close_listeners()
            raise
        for path, (sock, _) in inherited.items():
            log.warning("event=inherited_socket_unused socket=%s", path)
            sock.close()

    def close_listeners(self) -> None:
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR2, self._start_handover)
        self._slots = asyncio.Semaphore(self.settings.max_connections)
        for lst in self.listeners:
            self._accepting.append(asyncio.create_task(self._accept_loop(lst.protocol, lst.sock)))
            log.info("event=listening protocol=%s socket=%s", lst.protocol, lst.path)
        sd_notify("READY=1\nSTATUS=serving")
        if HANDOVER_NOTIFY_ENV in os.environ:
            # A successor told its predecessor (above); from now on systemd's
            # socket, now that the predecessor made us its MAINPID.
            restore = os.environ.pop(HANDOVER_NOTIFY_ENV)
            if restore:
                os.environ["NOTIFY_SOCKET"] = restore
            else:
                os.environ.pop("NOTIFY_SOCKET", None)
        status = asyncio.create_task(self._write_status())
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
                loop.remove_signal_handler(sig)
            status.cancel()
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.settings.runtime_dir(), "status.json"))
            await self._drain()

    async def _drain(self) -> None:
        sd_notify("STOPPING=1")
        for task in self._accepting:
            task.cancel()
        self.close_listeners()
        pending = set(self._inflight)
        log.info("event=draining inflight=%d", len(pending))
        if pending:
            done, late = await asyncio.wait(pending, timeout=self.settings.drain_timeout)
            for task in late:
                task.cancel()
            if late:
                log.warning("event=drain_timeout abandoned=%d", len(late))
                await asyncio.wait(late, timeout=1)

    async def _write_status(self, every: float = 2.0) -> None:
        """Keep <socket_dir>/status.json current for `lastlogin status`.

        Written through a descriptor of the (checked) directory, to a new
        temporary name (O_EXCL|O_NOFOLLOW) renamed into place: a symlink
        planted under either name is replaced, never written through.
        """
        directory = self.settings.runtime_dir()
        while True:
            doc = self.service.status()
            doc.update(pid=os.getpid(), written_at=time.time(),
                       inflight=len(self._inflight))
            try:
                write_file_atomic(directory, "status.json", json.dumps(doc).encode(), 0o644)
            except OSError as exc:
                log.warning("event=status_write_failed error=%s", show(str(exc)))
            await asyncio.sleep(every)

    def _start_handover(self) -> None:
        if getattr(self, "_handover", None) is None or self._handover.done():
            self._handover = asyncio.ensure_future(self.handover())

    async def handover(self, ready_timeout: float = 30.0) -> bool:
        """SIGUSR2: start a successor on our listening sockets, then step down.

        The sockets never close, so no login is refused while the daemon is
        replaced (a new version, new settings). The successor inherits them
        (LASTLOGIN_HANDOVER_FDS) and says READY=1 on a private notify socket;
        then this process stops accepting, drains and exits. If it never says
        so, this process terminates it and goes on serving.
        """
        import subprocess
        loop = asyncio.get_running_loop()
        fds = [lst.sock.fileno() for lst in self.listeners]
        handed = ",".join(f"{lst.path}={lst.sock.fileno()}" for lst in self.listeners)
        notify_path = os.path.join(self.settings.runtime_dir(), f".handover-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path,
                   **{HANDOVER_ENV: handed,
                      HANDOVER_NOTIFY_ENV: os.environ.get("NOTIFY_SOCKET", "")})
        try:
            child = subprocess.Popen(successor_command(self.config_path), env=env,
                                     pass_fds=fds, cwd="/")
            log.info("event=handover_started child_pid=%d", child.pid)
            try:
                async with asyncio.timeout(ready_timeout):
                    while not (await loop.sock_recv(notify, 4096)).startswith(b"READY=1"):
                        pass
            except TimeoutError:
                log.error("event=handover_failed child_pid=%d reason=not_ready", child.pid)
                child.terminate()
                await loop.run_in_executor(None, child.wait)
                return False
        finally:
            notify.close()
            with contextlib.suppress(OSError):
                os.unlink(notify_path)
        for lst in self.listeners:
            lst.owned = False           # the successor unlinks them when it is done
        # systemd (NotifyAccess=main) takes the successor as the service's
        # main process before this one exits.
        sd_notify(f"MAINPID={child.pid}")
        os.environ.pop("NOTIFY_SOCKET", None)   # no longer the service's process
        log.info("event=handover_done child_pid=%d", child.pid)
        self.request_stop()
        return True

    def reload(self) -> None:
        """SIGHUP: re-read the settings; keep the old ones if the new are bad."""
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("event=reload_failed key=%s reason=%s", exc.key, show(exc.reason))
            return
        fixed = [k for k in ("database_url", "socket_dir", "protocols", "socket_imap",
                             "socket_pop3", "socket_submission", "socket_managesieve",
                             "socket_mode", "socket_owner", "socket_group",
                             "max_connections", "data_dir", "spool_dir", "database_group")
                 if getattr(new, k) != getattr(self.settings, k)]
        if fixed:
            log.warning("event=reload_needs_restart keys=%s", ",".join(fixed))
        self.settings = new
        self._allowed_uids = new.resolved_uids()
        self.service.record_timeout = new.record_timeout
        self.service.policy.default_action = new.default_action
        self.service.policy.unloaded_action = new.rules_unloaded_action
        self.service.extras = Extras.from_settings(new)
        logging.getLogger("lastlogin").setLevel(new.log_level.upper())
        log.info("event=reloaded")

    async def _accept_loop(self, proto: str, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        slots = self._slots or asyncio.Semaphore(self.settings.max_connections)
        while True:
            if slots.locked():
                # Further peers wait in the listen backlog (Dovecot retries
                # nothing: they are served as soon as a slot frees up).
                now = time.monotonic()
                if now - self._limit_logged_at > 10:
                    self._limit_logged_at = now
                    log.warning("event=max_connections_reached limit=%d",
                                self.settings.max_connections)
            await slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                slots.release()
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("event=accept_failed protocol=%s error=%s", proto, exc)
                    await asyncio.sleep(0.1)
                    continue
                raise
            except BaseException:
                slots.release()
                raise
            conn.setblocking(False)
            task = asyncio.create_task(self._handle(proto, conn))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            task.add_done_callback(lambda _t: slots.release())

    # one connection
    async def _handle(self, proto: str, conn: socket.socket) -> None:
        started = time.monotonic()
        fds: list[int] = []
        peer: Peer | None = None
        req: LoginRequest | None = None
        try:
            peer = peer_of(conn)
            if peer.uid not in self._allowed_uids:
                raise ConnectionRefused(f"peer uid {peer.uid} is not allowed")
            req = await self._receive(conn, fds)
            client = ClientFd(fds[0], self.settings.client_write_timeout)
            answer = await self.service.login(proto, req, client)
            if answer.reply_fd is not None:
                fds.append(answer.reply_fd)         # closed below, once sent
            if answer.reply is not None:
                deadline = asyncio.get_running_loop().time() + self.settings.client_write_timeout
                await send_all(conn, answer.reply, answer.reply_fd, deadline)
            self._log_login(proto, req, answer, started)
        except PeerError as exc:
            if str(exc).startswith("peer closed after 0 bytes"):
                log.debug("event=probe protocol=%s peer=%s", proto, peer)   # `lastlogin status`
            else:
                self._log_refused(proto, peer, req, str(exc))
        except (ConnectionRefused, ProtocolError, RecordError) as exc:
            self._log_refused(proto, peer, req, str(exc))
        except TimeoutError:
            self._log_refused(proto, peer, req, "timed out")
        except OSError as exc:
            self._log_refused(proto, peer, req, f"socket error: {exc.strerror or exc}")
        except Exception as exc:  # noqa: BLE001 - one bad login never stops the daemon
            log.exception("event=internal_error protocol=%s peer=%s", proto, peer)
            self._log_refused(proto, peer, req, f"internal error: {type(exc).__name__}")
        finally:
            close_all(fds)
            conn.close()

    async def _receive(self, conn: socket.socket, fds: list[int]) -> LoginRequest:
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
        buf = await read_message(conn, self.settings.max_request_bytes, fds,
                                 request_complete, "request", deadline)
        if len(fds) != 1:
            raise ProtocolError(f"expected one client fd, got {len(fds)}")
        if len(buf) > INLINE_PARSE_BYTES:
            # A big request (up to max_request_bytes, every byte escaped)
            # takes tens of ms to un-escape: off the loop, which keeps
            # serving the other logins meanwhile.
            return await asyncio.to_thread(parse_request, buf)
        return parse_request(buf)

    def _log_login(self, proto: str, req: LoginRequest, answer: Answer,
                   started: float) -> None:
        if self.service.metrics:
            self.service.metrics.logins.labels(proto, answer.record.outcome).inc()
        if not log.isEnabledFor(logging.INFO):
            return
        rec = answer.record
        log.info("event=login protocol=%s user=%s rip=%s lip=%s outcome=%s rule=%s "
                 "mech=%s alerts=%d ms=%.2f%s",
                 proto, show(req.username), rec.remote_ip or "-", rec.local_ip or "-",
                 rec.outcome, rec.rule_id if rec.rule_id is not None else "-",
                 show(rec.auth_mech), len(rec.alerts_shown),
                 (time.monotonic() - started) * 1000,
                 Shown("" if answer.allowed else f" reason={show(answer.reason)}"))

    def _log_refused(self, proto: str, peer: Peer | None, req: LoginRequest | None,
                     reason: str) -> None:
        if self.service.metrics:
            self.service.metrics.refused_connections.inc()
        user = show(req.username) if req else "-"
        log.warning("event=connection_refused protocol=%s peer=%s user=%s reason=%s",
                    proto, show(str(peer) if peer else "-"), user, show(reason))


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
