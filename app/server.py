"""Connections: one login each, from accept to the last byte written.

One asyncio loop serves every protocol socket. A connection is one login:
check the peer (SO_PEERCRED), read the request (recvmsg, so the client fd is
never dropped), let the service decide, plan and record, write what it says
-- the client's bytes, then the reply -- and close our copy of the client
fd on every path. A bad connection costs one log line and ends without a
reply, which Dovecot treats as a refusal. Every byte on every socket is
written here; the sockets themselves come from app/sockets.py and the
lifecycle around them from app/daemon.py.

The common login runs on callbacks, without a Task: the listener's
readiness accepts a batch; each connection is read at once (the request and
its fd are usually there already; otherwise the loop wakes it when they
come, and one sweep timer for all waiting connections enforces
request_timeout); the service decides, plans and hands the record to the
recorder, whose callback writes the answer. What is rare -- a big request
parsed off the loop, a login that needs a coroutine (system groups, a
previous login read for an alert, a next hop), a write that has to wait --
continues in a Task with the same steps.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import os
import socket
import struct
import time
from typing import NamedTuple

from .config import Settings
from .fdio import (PeerError, close_all, receive_some, send_all, send_some, write_fd,
                   write_some)
from .logs import Shown, emit, show
from .protocol import LoginRequest, ProtocolError, parse_request, request_complete
from .recorder import Pending
from .safedirs import write_file_atomic
from .service import Answer, LoginService
from .sockets import Listener
from .status import STATUS_FILE

log = logging.getLogger("lastlogin.server")

INLINE_PARSE_BYTES = 16 << 10       # real requests are a few hundred bytes
# uvloop rounds a timer to whole ms of its cached clock: it can fire up to
# ~1 ms before its time. A sweep ends what is due within this slack, so it
# never wakes to find nothing and re-arm for a sub-ms delay.
SWEEP_SLACK = 0.002


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


_AF_UNIX, _SOCK_STREAM = int(socket.AF_UNIX), int(socket.SOCK_STREAM)
# socket.socket without its Python layer (__init__, close, the IntEnum
# properties): everything a connection needs is the C type's.
_RawSocket = _socket.socket
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Connection:
    """One login on the loop, from accept to close; a Task only when it must wait
    for something other than readiness or the recorder."""

    __slots__ = ("server", "proto", "sock", "fds", "buf", "peer", "req", "started",
                 "deadline", "waiting", "pending", "task", "closed")

    def __init__(self, server: "Server", proto: str, sock: _socket.socket) -> None:
        self.server = server
        self.proto = proto
        self.sock = sock
        self.fds: list[int] = []
        self.buf = bytearray()
        self.peer: Peer | None = None
        self.req: LoginRequest | None = None
        self.started = time.monotonic()
        self.deadline = 0.0
        self.waiting = False        # for the request: a reader on the loop
        self.pending: Pending | None = None     # the record, with the recorder
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def begin(self) -> None:
        try:
            peer = self.peer = peer_of(self.sock)
            if peer.uid not in self.server._allowed_uids:
                raise ConnectionRefused(f"peer uid {peer.uid} is not allowed")
            self.read()
        except Exception as exc:  # noqa: BLE001 - one bad login never stops the daemon
            self.fail(exc)

    def read(self) -> None:
        """Read what is there; wait for readiness if the request is not whole yet."""
        settings = self.server.settings
        while True:
            try:
                message = receive_some(self.sock, self.buf, settings.max_request_bytes,
                                       self.fds, request_complete, "request")
            except BlockingIOError:
                if not self.waiting:
                    self.server._wait_for(self)
                return
            if message is not None:
                break
        if self.waiting:
            self.server._waited(self)
        self.buf = None             # type: ignore[assignment]
        self.received(message)

    def readable(self) -> None:
        try:
            self.read()
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)

    def received(self, message: bytes) -> None:
        if len(self.fds) != 1:
            raise ProtocolError(f"expected one client fd, got {len(self.fds)}")
        if len(message) > INLINE_PARSE_BYTES:
            # A big request (up to max_request_bytes, every byte escaped)
            # takes tens of ms to un-escape: off the loop, which keeps
            # serving the other logins meanwhile.
            self.run(self.server._finish(self, message))
            return
        req = self.req = parse_request(message)
        pending = self.server.service.login_now(self.proto, req, self.answered)
        if pending is None:
            self.run(self.server._finish(self, None))
        elif not self.closed:
            self.pending = pending

    def answered(self, answer: Answer | None, exc: BaseException | None) -> None:
        """The service's word, once the record is durable (or cannot be)."""
        self.pending = None
        if self.closed:             # cut off meanwhile (drain)
            if answer is not None and answer.reply_fd is not None:
                os.close(answer.reply_fd)
            return
        if exc is not None:
            self.fail(exc)
            return
        assert answer is not None
        try:
            if answer.reply_fd is not None:
                self.fds.append(answer.reply_fd)        # closed below, once sent
            self.send(answer)
        except Exception as err:  # noqa: BLE001
            self.fail(err)

    def send(self, answer: Answer) -> None:
        """The client's bytes first (imap sends its tagged OK as soon as it has
        the reply), then the reply and the fd it carries; what cannot be
        written now is written by a Task, within client_write_timeout."""
        to_client, reply = answer.to_client, answer.reply
        client_sent = write_some(self.fds[0], to_client) if to_client else 0
        if client_sent == len(to_client) and reply is not None:
            reply_sent = send_some(self.sock, reply, answer.reply_fd)
            if reply_sent != len(reply):
                self.run(self.server._send_rest(self, answer, client_sent, reply_sent))
                return
        elif client_sent != len(to_client):
            self.run(self.server._send_rest(self, answer, client_sent, 0))
            return
        self.server._log(self.proto, self.peer, self.req, answer, self.started)  # type: ignore[arg-type]
        self.close()

    def run(self, coro) -> None:
        """The rest of this login in a Task (which closes the connection).
        The done callback closes even a Task cancelled (by ``cut``) before
        its first step, whose ``finally`` never runs."""
        task = self.task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(lambda _t: self.close())

    def fail(self, exc: BaseException) -> None:
        self.server._failed(self, exc)
        self.close()

    def cut(self) -> None:
        """Drain ran out of time: end this login now, without a reply."""
        if self.task is not None:
            self.task.cancel()      # its finally, or its done callback, closes
        else:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.waiting:
            self.server._waited(self)
        if self.pending is not None:
            self.pending.abandon()
            self.pending = None
        close_all(self.fds)
        self.sock.close()
        self.server._closed(self)


class Server:
    """Accept on the listeners, handle each connection, drain on request."""

    def __init__(self, settings: Settings, service: LoginService,
                 listeners: list[Listener]) -> None:
        self.service = service
        self.listeners = listeners
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading: dict[int, Listener] = {}     # listeners we accept on, by fd
        self._full: list[Listener] = []             # not read: max_connections reached
        self._inflight: set[Connection] = set()
        self._waiting: dict[Connection, None] = {}  # for their request, oldest first
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0                        # when it fires, on the loop's clock
        self._idle: asyncio.Future[None] | None = None
        self._accepting = False
        self._limit_logged_at = -1e9
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        """New settings (SIGHUP): the next connection uses them."""
        self.settings = settings
        self._allowed_uids = settings.resolved_uids()

    def start(self) -> None:
        """Accept on every listener (from within the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        for lst in self.listeners:
            lst.sock.setblocking(False)
            self._listen(lst)
            log.info("event=listening protocol=%s socket=%s", lst.protocol, lst.path)

    def close_listeners(self) -> None:
        self._accepting = False
        for fd in list(self._reading):
            self._unlisten(fd)
        self._full.clear()
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, close the listeners, let in-flight logins finish
        for at most ``timeout`` seconds."""
        self.close_listeners()
        log.info("event=draining inflight=%d", len(self._inflight))
        if self._inflight:
            self._idle = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._idle], timeout=timeout)
            late = list(self._inflight)
            if late:
                tasks = [c.task for c in late if c.task is not None]
                for conn in late:
                    conn.cut()
                log.warning("event=drain_timeout abandoned=%d", len(late))
                if tasks:
                    await asyncio.wait(tasks, timeout=1)

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

    # accepting
    def _listen(self, lst: Listener) -> None:
        fd = lst.sock.fileno()
        if self._accepting and fd >= 0 and fd not in self._reading:
            assert self._loop is not None
            self._loop.add_reader(fd, self._acceptable, lst)
            self._reading[fd] = lst

    def _unlisten(self, fd: int) -> None:
        if self._reading.pop(fd, None) is not None and self._loop is not None:
            self._loop.remove_reader(fd)

    def _acceptable(self, lst: Listener) -> None:
        """Accept what is waiting, up to max_connections at once; further
        peers wait in the listen backlog (Dovecot retries nothing: they are
        served as soon as a slot frees up)."""
        accept = lst.sock._accept           # the fd alone: no socket object made twice
        inflight, limit = self._inflight, self.settings.max_connections
        while True:
            if len(inflight) >= limit:
                self._unlisten(lst.sock.fileno())
                self._full.append(lst)
                now = time.monotonic()
                if now - self._limit_logged_at > 10:
                    self._limit_logged_at = now
                    log.warning("event=max_connections_reached limit=%d", limit)
                return
            try:
                fd, _ = accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue                    # gone before we took it
            except OSError as exc:
                # Out of descriptors or memory (or worse): one line, a pause, again.
                if exc.errno in _OUT_OF_FDS:
                    log.error("event=accept_failed protocol=%s error=%s", lst.protocol, exc)
                else:
                    log.exception("event=accept_failed protocol=%s error=%s",
                                  lst.protocol, exc)
                self._unlisten(lst.sock.fileno())
                assert self._loop is not None
                self._loop.call_later(0.1, self._listen, lst)
                return
            conn = Connection(self, lst.protocol, _RawSocket(_AF_UNIX, _SOCK_STREAM, 0, fd))
            inflight.add(conn)
            conn.begin()

    def _closed(self, conn: Connection) -> None:
        self._inflight.discard(conn)
        if self._full:
            full, self._full = self._full, []
            for lst in full:
                self._listen(lst)
        if self._idle is not None and not self._inflight and not self._idle.done():
            self._idle.set_result(None)

    # waiting for a request: one reader each, one timer for all of them
    def _wait_for(self, conn: Connection) -> None:
        loop = self._loop
        assert loop is not None
        # On the loop's clock, which the sweep timer runs on (uvloop's is
        # not time.monotonic()); the connection arrived this loop turn.
        deadline = loop.time() + self.settings.request_timeout
        loop.add_reader(conn.sock.fileno(), conn.readable)
        conn.waiting = True         # only once the reader is there (close undoes both)
        conn.deadline = deadline
        self._waiting[conn] = None
        # A SIGHUP may have lowered request_timeout: an earlier deadline
        # than the armed one re-arms the sweep.
        if self._sweep is None or deadline < self._sweep_at:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        assert self._loop is not None
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = self._loop.call_at(when, self._expire)

    def _waited(self, conn: Connection) -> None:
        conn.waiting = False
        assert self._loop is not None
        self._loop.remove_reader(conn.sock.fileno())
        self._waiting.pop(conn, None)

    def _expire(self) -> None:
        """Connections past request_timeout end; the timer follows the next
        deadline. One connection that cannot be failed stops neither the
        others nor the timer."""
        self._sweep = None
        assert self._loop is not None
        due = self._loop.time() + SWEEP_SLACK
        try:
            for conn in [c for c in self._waiting if c.deadline <= due]:
                try:
                    conn.fail(TimeoutError())
                except Exception:  # noqa: BLE001 - the sweep goes on
                    log.exception("event=internal_error protocol=%s peer=%s",
                                  conn.proto, conn.peer)
                    self._waiting.pop(conn, None)   # never swept again
        finally:
            if self._waiting and self._sweep is None:
                self._arm(min(c.deadline for c in self._waiting))

    # what continues in a Task
    async def _finish(self, conn: Connection, message: bytes | None) -> None:
        """The login after its request, as a coroutine: a big request parsed
        off the loop, or a login that needs ``service.login``."""
        try:
            if message is not None:
                conn.req = await asyncio.to_thread(parse_request, message)
            assert conn.req is not None
            answer = await self.service.login(conn.proto, conn.req, conn.fds[0])
            if answer.reply_fd is not None:
                conn.fds.append(answer.reply_fd)    # closed below, once sent
            await self._send(conn.sock, conn.fds[0], answer)
            self._log(conn.proto, conn.peer, conn.req, answer, conn.started)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - one bad login never stops the daemon
            self._failed(conn, exc)
        finally:
            conn.close()

    async def _send_rest(self, conn: Connection, answer: Answer, client_sent: int,
                         reply_sent: int) -> None:
        """What a peer did not take at once, within client_write_timeout."""
        try:
            timeout = self.settings.client_write_timeout
            if client_sent < len(answer.to_client):
                await write_fd(conn.fds[0], answer.to_client[client_sent:], timeout)
            if answer.reply is not None:
                deadline = asyncio.get_running_loop().time() + timeout
                await send_all(conn.sock, answer.reply[reply_sent:],
                               answer.reply_fd if reply_sent == 0 else None, deadline)
            self._log(conn.proto, conn.peer, conn.req, answer, conn.started)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001
            self._failed(conn, exc)
        finally:
            conn.close()

    async def _send(self, conn: socket.socket, client_fd: int, answer: Answer) -> None:
        """The client's bytes first (imap sends its tagged OK as soon as it has
        the reply), then the reply and the fd it carries."""
        timeout = self.settings.client_write_timeout
        if answer.to_client:
            await write_fd(client_fd, answer.to_client, timeout)
        if answer.reply is not None:
            deadline = asyncio.get_running_loop().time() + timeout
            await send_all(conn, answer.reply, answer.reply_fd, deadline)

    def _failed(self, conn: Connection, exc: BaseException) -> None:
        """The one log line of a connection that ends without a reply."""
        proto, peer, req = conn.proto, conn.peer, conn.req
        if isinstance(exc, PeerError):
            if str(exc).startswith("peer closed after 0 bytes"):
                log.debug("event=probe protocol=%s peer=%s", proto, peer)   # `lastlogin status`
            else:
                self._log_refused(proto, peer, req, str(exc))
        elif isinstance(exc, (ConnectionRefused, ProtocolError)):
            self._log_refused(proto, peer, req, str(exc))
        elif isinstance(exc, TimeoutError):
            self._log_refused(proto, peer, req, "timed out")
        elif isinstance(exc, OSError):
            self._log_refused(proto, peer, req, f"socket error: {exc.strerror or exc}")
        else:
            log.error("event=internal_error protocol=%s peer=%s", proto, peer, exc_info=exc)
            self._log_refused(proto, peer, req, f"internal error: {type(exc).__name__}")

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
        emit(log, logging.INFO, "event=login protocol=%s user=%s rip=%s lip=%s outcome=%s "
             "rule=%s mech=%s alerts=%d ms=%.2f%s",
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
