"""Connections: one login each, from accept to the last byte written.

One asyncio loop serves every protocol socket. A connection is one login:
check the peer (SO_PEERCRED), read the request (recvmsg, so the client fd is
never dropped), let the service decide, plan and record, write what it says
-- the client's bytes, then the reply -- and close our copy of the client
fd on every path. A bad connection costs one log line and ends without a
reply, which Dovecot treats as a refusal. Every byte on every socket is
written here; the sockets themselves come from app/sockets.py and the
lifecycle around them from app/daemon.py.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from typing import NamedTuple

from .config import Settings
from .fdio import PeerError, close_all, read_message, send_all, write_fd
from .logs import Shown, show
from .protocol import LoginRequest, ProtocolError, parse_request, request_complete
from .safedirs import write_file_atomic
from .service import Answer, LoginService
from .sockets import Listener
from .status import STATUS_FILE

log = logging.getLogger("lastlogin.server")

INLINE_PARSE_BYTES = 16 << 10       # real requests are a few hundred bytes


class ConnectionRefused(Exception):
    """A connection that ends without a reply; the text is logged."""


_PEERCRED = struct.Struct("3i")


class Peer(NamedTuple):        # a tuple: made once per connection, cheaply
    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid}"


_SOL_SOCKET, _SO_PEERCRED = socket.SOL_SOCKET, socket.SO_PEERCRED


def peer_of(conn: socket.socket) -> Peer:
    return Peer._make(_PEERCRED.unpack(conn.getsockopt(_SOL_SOCKET, _SO_PEERCRED,
                                                       _PEERCRED.size)))


class Server:
    """Accept on the listeners, handle each connection, drain on request."""

    def __init__(self, settings: Settings, service: LoginService,
                 listeners: list[Listener]) -> None:
        self.service = service
        self.listeners = listeners
        self._accepting: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None
        self._limit_logged_at = -1e9
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        """New settings (SIGHUP): the next connection uses them."""
        self.settings = settings
        self._allowed_uids = settings.resolved_uids()

    def start(self) -> None:
        """Accept on every listener (from within the running loop)."""
        self._slots = asyncio.Semaphore(self.settings.max_connections)
        for lst in self.listeners:
            self._accepting.append(asyncio.create_task(self._accept_loop(lst.protocol, lst.sock)))
            log.info("event=listening protocol=%s socket=%s", lst.protocol, lst.path)

    def close_listeners(self) -> None:
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, close the listeners, let in-flight logins finish
        for at most ``timeout`` seconds."""
        for task in self._accepting:
            task.cancel()
        self.close_listeners()
        pending = set(self._inflight)
        log.info("event=draining inflight=%d", len(pending))
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                log.warning("event=drain_timeout abandoned=%d", len(late))
                await asyncio.wait(late, timeout=1)

    async def write_status(self, every: float = 2.0) -> None:
        """Keep <runtime dir>/status.json current for `lastlogin status`.

        Written through a descriptor of the (checked) directory, to a new
        temporary name (O_EXCL|O_NOFOLLOW) renamed into place: a symlink
        planted under either name is replaced, never written through.
        """
        while True:
            state = self.service.status()
            state.pid, state.written_at = os.getpid(), time.time()
            state.inflight = len(self._inflight)
            try:
                write_file_atomic(self.settings.runtime_dir(), STATUS_FILE,
                                  state.to_json().encode(), 0o644)
            except OSError as exc:
                log.warning("event=status_write_failed error=%s", show(str(exc)))
            await asyncio.sleep(every)

    async def _accept_loop(self, proto: str, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.max_connections)
        slots = self._slots
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
            if conn.getblocking():      # asyncio's sock_accept made it non-blocking
                conn.setblocking(False)
            task = asyncio.create_task(self._handle(proto, conn))
            self._inflight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: "asyncio.Task[None]") -> None:
        self._inflight.discard(task)
        if self._slots is not None:
            self._slots.release()

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
            answer = await self.service.login(proto, req, fds[0])
            if answer.reply_fd is not None:
                fds.append(answer.reply_fd)         # closed below, once sent
            await self._send(conn, fds[0], answer)
            self._log(proto, peer, req, answer, started)
        except PeerError as exc:
            if str(exc).startswith("peer closed after 0 bytes"):
                log.debug("event=probe protocol=%s peer=%s", proto, peer)   # `lastlogin status`
            else:
                self._log_refused(proto, peer, req, str(exc))
        except (ConnectionRefused, ProtocolError) as exc:
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

    async def _send(self, conn: socket.socket, client_fd: int, answer: Answer) -> None:
        """The client's bytes first (imap sends its tagged OK as soon as it has
        the reply), then the reply and the fd it carries."""
        timeout = self.settings.client_write_timeout
        if answer.to_client:
            await write_fd(client_fd, answer.to_client, timeout)
        if answer.reply is not None:
            deadline = asyncio.get_running_loop().time() + timeout
            await send_all(conn, answer.reply, answer.reply_fd, deadline)

    def _log(self, proto: str, peer: Peer, req: LoginRequest, answer: Answer,
             started: float) -> None:
        rec = answer.record
        if rec is None:                  # neither recorded nor spooled
            self._log_refused(proto, peer, req, answer.reason)
            return
        if self.service.metrics:
            self.service.metrics.logins.labels(proto, rec.outcome).inc()
        if not log.isEnabledFor(logging.INFO):
            return
        log.info("event=login protocol=%s user=%s rip=%s lip=%s outcome=%s rule=%s "
                 "mech=%s alerts=%d ms=%.2f%s",
                 proto, show(req.username), rec.remote_ip or "-", rec.local_ip or "-",
                 rec.outcome, rec.rule_id if rec.rule_id is not None else "-",
                 show(rec.auth_mech), answer.alerts,
                 (time.monotonic() - started) * 1000,
                 Shown("" if answer.allowed else f" reason={show(answer.reason)}"))

    def _log_refused(self, proto: str, peer: Peer | None, req: LoginRequest | None,
                     reason: str) -> None:
        if self.service.metrics:
            self.service.metrics.refused_connections.inc()
        user = show(req.username) if req else "-"
        log.warning("event=connection_refused protocol=%s peer=%s user=%s reason=%s",
                    proto, show(str(peer) if peer else "-"), user, show(reason))
