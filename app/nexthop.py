"""Hand a login on to the next post-login socket, as Dovecot would.

For sites that keep `script-login` scripts or `rawlog` behind lastlogin: the
request (with lastlogin's merged fields) and the client fd go to the next
socket; its reply -- and the fd it may send back -- are relayed to Dovecot.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from .fdio import PeerError, close_all, read_message, send_all
from .protocol import build_request, LoginRequest, split_tabescaped

REPLY_LIMIT = 1 << 20


@dataclass(frozen=True)
class HopReply:
    line: bytes | None      # None: refused (closed without a full line) or unusable
    fd: int | None          # an fd it sent back (script-login always does)
    reason: str = ""
    # The reply was there but unusable: the client gets a temporary failure
    # (a refusal by the hop itself is its own business, like a deny).
    tempfail: bool = False


def reply_problem(line: bytes) -> str | None:
    """Why a next hop's reply cannot go to Dovecot, or None if it can.

    It must be exactly one non-empty line whose first field (the session's
    username) is not empty; anything else would crash or confuse the mail
    process (protocol spec §5.1).
    """
    if not line.endswith(b"\n"):
        return "reply does not end in LF"
    body = line[:-1]
    lines = body.split(b"\n")
    if len(lines) > 1:
        return f"reply has {len(lines)} lines, not one"
    if not body.strip():
        return "empty reply line"
    fields = split_tabescaped(body)
    if not fields or not fields[0].strip():
        return "reply has no username"
    if b"\x00" in body:
        return "reply holds a NUL byte"
    return None


async def forward(path: str, req: LoginRequest, fields: list[bytes], client_fd: int,
                  timeout: float) -> HopReply:
    """Send the login to ``path``; a refusal is a HopReply with line None."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    fds: list[int] = []
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, path)
            await send_all(sock, build_request(req.local_ip, req.remote_ip, req.username,
                                               fields), client_fd)
            try:
                line = await read_message(sock, REPLY_LIMIT, fds,
                                          lambda b: b.endswith(b"\n"), "reply")
            except PeerError as exc:
                close_all(fds)
                return HopReply(None, None, f"next hop {path}: {exc}")
        problem = reply_problem(line)
        if problem is not None:
            close_all(fds)
            return HopReply(None, None, f"next hop {path}: {problem}", tempfail=True)
        # keep at most one fd, as Dovecot's own reader does
        fd = fds.pop(0) if fds else None
        close_all(fds)
        return HopReply(line, fd)
    except (OSError, TimeoutError) as exc:
        close_all(fds)
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return HopReply(None, None, f"next hop {path}: {reason}")
    finally:
        sock.close()
