"""Non-blocking socket I/O with descriptor passing, for the asyncio loop.

Every call is non-blocking by its flags (MSG_DONTWAIT), whatever the
socket's own mode: an accepted connection is used as the kernel hands it
over, without the two system calls that switching its mode would cost.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import socket
from typing import Callable

MAX_FDS = 4                     # room for more than the one fd a peer should send
RECV_CHUNK = 65536
_INT = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * _INT)
# Plain ints: socket's flags are IntFlag members, whose "&" and "|" run
# Python code on every call.
_CLOEXEC, _CTRUNC = int(socket.MSG_CMSG_CLOEXEC), int(socket.MSG_CTRUNC)
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_SCM = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
_AF_UNIX, _SOCK_STREAM = int(socket.AF_UNIX), int(socket.SOCK_STREAM)


class PeerError(ValueError):
    """The peer broke the framing (closed early, sent too much, too many fds)."""


async def wait_ready(fd: int, writable: bool, deadline: float | None = None) -> None:
    """Wait until ``fd`` is readable (writable); TimeoutError past ``deadline``
    (event-loop time). Only a peer that makes us wait pays for the timer."""
    loop = asyncio.get_running_loop()
    if deadline is not None:
        async with asyncio.timeout_at(deadline):
            await wait_ready(fd, writable)
        return
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    add, remove = ((loop.add_writer, loop.remove_writer) if writable
                   else (loop.add_reader, loop.remove_reader))
    add(fd, ready)
    try:
        await fut
    finally:
        remove(fd)


def take_fds(ancdata: list[tuple[int, int, bytes]], into: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % _INT])
            into.extend(fds)


def receive_some(conn: socket.socket, buf: bytearray, limit: int, fds: list[int],
                 complete: Callable[[bytearray], bool], what: str) -> bytes | None:
    """One recvmsg: the whole message once ``complete`` says so, else None
    (the bytes so far are in ``buf``); BlockingIOError when nothing came.

    Every read is a recvmsg with room for fds: a plain recv() would make the
    kernel drop a descriptor that arrives with those bytes. Every fd
    received is appended to ``fds``.
    """
    data, anc, flags, _ = conn.recvmsg(RECV_CHUNK, _ANC_SIZE, _RECV_FLAGS)
    if anc:
        take_fds(anc, fds)
    if flags & _CTRUNC:
        raise PeerError(f"more fds than a {what} carries")
    if not data:
        raise PeerError(f"peer closed after {len(buf)} bytes, before a full {what}")
    if not buf and len(data) <= limit and complete(data):
        return data             # the common case: one recvmsg, no copy
    buf += data
    if len(buf) > limit:
        raise PeerError(f"{what} larger than {limit} bytes")
    if complete(buf):
        return bytes(buf)
    return None


async def read_message(conn: socket.socket, limit: int, fds: list[int],
                       complete: Callable[[bytearray], bool], what: str,
                       deadline: float | None = None) -> bytes:
    """Read until ``complete(buf)``; every fd received is appended to ``fds``."""
    buf = bytearray()
    while True:
        try:
            message = receive_some(conn, buf, limit, fds, complete, what)
        except BlockingIOError:
            await wait_ready(conn.fileno(), False, deadline)
            continue
        if message is not None:
            return message


def send_some(conn: socket.socket, data: bytes, fd: int | None = None) -> int:
    """One non-blocking send; ``fd`` rides on the first byte. The bytes sent
    (0 when the socket takes none now)."""
    try:
        if fd is None:
            return conn.send(data, SEND_FLAGS)
        return conn.sendmsg([data], [(*_SCM, array.array("i", [fd]))], SEND_FLAGS)
    except BlockingIOError:
        return 0


def write_some(fd: int, data: bytes) -> int:
    """One non-blocking write to a client connection (see ``write_fd``)."""
    # Family and type given: no system calls to look them up (send needs neither).
    sock = socket.socket(_AF_UNIX, _SOCK_STREAM, 0, fd)
    try:
        return sock.send(data, SEND_FLAGS)
    except BlockingIOError:
        return 0
    finally:
        sock.detach()


async def send_all(conn: socket.socket, data: bytes, fd: int | None = None,
                   deadline: float | None = None) -> None:
    """Send ``data`` on a non-blocking socket; ``fd`` rides on the first byte."""
    if fd is None:
        sent = send_some(conn, data)    # the common case: all of it at once
        if sent == len(data):
            return
        data = data[sent:]
    view = memoryview(data)
    anc = [(*_SCM, array.array("i", [fd]))] if fd is not None else []
    while view:
        try:
            sent = conn.sendmsg([view], anc, SEND_FLAGS)
        except BlockingIOError:
            await wait_ready(conn.fileno(), True, deadline)
            continue
        view, anc = view[sent:], []


async def write_fd(fd: int, data: bytes, timeout: float) -> None:
    """Write to a client connection without blocking and without reading it.

    The fd is shared with Dovecot's mail process, so its flags stay as they
    are: MSG_DONTWAIT makes each send non-blocking by itself. Waiting for
    it is the exception: uvloop's add_writer sets O_NONBLOCK on it (libuv's
    uv_poll_init), so the flags it had are put back after each wait.
    """
    sock = socket.socket(fileno=fd)
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view, SEND_FLAGS)
            except BlockingIOError:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                try:
                    await wait_ready(fd, True, deadline)
                finally:
                    if fcntl.fcntl(fd, fcntl.F_GETFL) != flags:
                        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
                continue
            view = view[sent:]
    finally:
        sock.detach()


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
