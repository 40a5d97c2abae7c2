"""IMAP and POP3 clients for a Dovecot on 127.0.0.1, shared by the end-to-end
tests and the benchmarks.

Two kinds: ``imap_login``/``pop3_login`` log in with the standard library's
clients, assert every step and return the open session (tests);
``imap_login_ok``/``pop3_login_ok`` speak the few lines a login needs over a
raw socket, log out and return whether Dovecot said "Logged in" (the
benchmark's load generator, where a failure is counted, not raised).
"""

from __future__ import annotations

import imaplib
import poplib
import socket
from typing import Callable


def imap_quote(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def imap_login(port: int, user: bytes, password: bytes = b"secret") -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    typ, data = client._simple_command("LOGIN", imap_quote(user), imap_quote(password))
    text = b" ".join(data)
    assert typ == "OK" and b"Logged in" in text, (typ, data)
    assert b"initialization failed" not in text
    client.state = "AUTH"
    typ, data = client.select("INBOX")       # the session really works
    assert typ == "OK", data
    return client


def pop3_login(port: int, user: bytes, password: bytes = b"secret") -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=20)
    client._putcmd("USER " + user.decode("latin-1"))   # poplib sends latin-1 as bytes
    assert client._getresp().startswith(b"+OK")
    client._putcmd("PASS " + password.decode("latin-1"))
    assert client._getresp() == b"+OK Logged in."
    assert client.stat() == (0, 0)          # -ERR [SYS/TEMP] would raise here
    return client


def raw_session(port: int, lines: list[bytes]) -> bytes:
    """Send the lines after the greeting; everything the server said, to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        f = s.makefile("rb")
        greeting = f.readline()
        assert greeting.startswith((b"* OK", b"+OK")), greeting
        for line in lines:
            s.sendall(line + b"\r\n")
            if line.startswith(b"USER"):
                assert f.readline().startswith(b"+OK")
        said = b""
        while line := f.readline():
            said += line
            if line.startswith((b"a1 OK", b"+OK Logged in")):   # let in: leave politely
                s.sendall(b"a2 LOGOUT\r\n" if line.startswith(b"a1") else b"QUIT\r\n")
        return said


def recv_until(s: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """Read until ``done(everything so far)`` or EOF."""
    buf = b""
    while not done(buf):
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def _line(buf: bytes) -> bool:
    return buf.endswith(b"\r\n")


def _tagged(tag: bytes) -> Callable[[bytes], bool]:
    """The tagged response to command ``tag`` has arrived (a whole line)."""
    return lambda b: b.endswith(b"\r\n") and (b"\r\n" + b).rsplit(b"\r\n", 2)[-2].startswith(
        tag + b" ")


def imap_login_ok(port: int, user: str, password: str = "secret",
                  source: str | None = None) -> bool:
    """LOGIN then LOGOUT; True if the login's tagged OK says "Logged in".
    ``source``: the client's address (any 127.x.y.z: all of 127/8 is loopback)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30,
                                  source_address=(source, 0) if source else None) as s:
        recv_until(s, _line)
        s.sendall(f'a LOGIN "{user}" "{password}"\r\n'.encode())
        reply = recv_until(s, _tagged(b"a"))
        ok = b"a OK" in reply and b"Logged in" in reply and b"initialization failed" not in reply
        s.sendall(b"b LOGOUT\r\n")
        recv_until(s, lambda b: b"b OK" in b)
        return ok


def pop3_login_ok(port: int, user: str, password: str = "secret") -> bool:
    """USER, PASS then QUIT; True if PASS was answered "+OK Logged in."."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        recv_until(s, _line)
        s.sendall(f"USER {user}\r\n".encode())
        recv_until(s, _line)
        s.sendall(f"PASS {password}\r\n".encode())
        ok = recv_until(s, _line).startswith(b"+OK Logged in.")
        s.sendall(b"QUIT\r\n")
        recv_until(s, _line)
        return ok
