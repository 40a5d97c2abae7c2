"""A post-login client that behaves like Dovecot's mail process.

It connects to the daemon's socket, sends the request and one client fd in
one sendmsg(), and reads the reply until LF or EOF.
"""

from __future__ import annotations

import array
import socket
from dataclasses import dataclass


@dataclass
class Exchange:
    reply: bytes            # b"" when the daemon closed without a reply
    client: socket.socket   # our end of the "client connection" the fd stands for

    @property
    def refused(self) -> bool:
        return not self.reply.endswith(b"\n")

    def client_saw(self, timeout: float = 5.0) -> bytes:
        """Everything written to the client fd, up to EOF."""
        self.client.settimeout(timeout)
        out = bytearray()
        while chunk := self.client.recv(65536):
            out += chunk
        return bytes(out)


def send_request(path: str, request: bytes, *, fds: int = 1, timeout: float = 20.0,
                 ) -> Exchange:
    """One login: request + ``fds`` passed descriptors; returns the reply."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        raise
    client, remote = socket.socketpair()
    extra = [socket.socketpair() for _ in range(max(0, fds - 1))]
    passed = [remote.fileno()] + [b.fileno() for _, b in extra]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", passed[:fds]))] if fds else []
    reply = bytearray()
    try:
        conn.sendmsg([request], anc)
        # The mail process keeps its fd until the session ends; we stand in
        # for the whole chain, so drop ours: EOF on `client` then proves the
        # daemon closed its copy too.
        remote.close()
        for a, b in extra:
            a.close()
            b.close()
        while not reply.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass            # closed on us: a refusal, as Dovecot would see it
    finally:
        remote.close()
        conn.close()
    return Exchange(bytes(reply), client)


def answered(path: str, request: bytes, timeout: float = 30.0) -> bool:
    """One login for a load generator: True if a reply line came back.
    Nothing is raised and every socket is closed either way."""
    try:
        ex = send_request(path, request, timeout=timeout)
    except OSError:             # refused, or no reply within the timeout
        return False
    ex.client.close()
    return not ex.refused
