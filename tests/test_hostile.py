"""Hostile and broken peers: fuzzing the codec and the socket, fd leaks, stalls."""

from __future__ import annotations

import array
import os
import random
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from app.protocol import (ProtocolError, build_request, parse_request,
                          request_complete)
from tests.builders import request_bytes
from tests.harness.daemon import make_daemon
from tests.harness.postlogin import send_request

# What Dovecot may hand us: any bytes in the username and the userdb fields
# (they are tab-escaped on the wire); the addresses are written unescaped, so
# they hold no TAB, LF or \x01 (Dovecot prints them from a parsed address).
usernames = st.binary(min_size=1, max_size=64)
userdb_fields = st.lists(st.binary(max_size=64), max_size=12)
addresses = st.binary(max_size=40).map(
    lambda b: b.translate(None, b"\t\n\x01"))


@st.composite
def frames(draw) -> tuple[bytes, tuple[bytes, bytes, bytes, list[bytes]]]:
    """A valid request as Dovecot writes it, with fuzzed contents."""
    lip, rip, user, fs = draw(addresses), draw(addresses), draw(usernames), draw(userdb_fields)
    return build_request(lip, rip, user, fs), (lip, rip, user, fs)


@given(frames())
def test_codec_round_trip(frame):
    """parse_request(build_request(x)) == x, for arbitrary bytes in the
    username and the fields (an empty field carries nothing and is dropped)."""
    data, (lip, rip, user, fs) = frame
    req = parse_request(data)
    assert (req.local_ip, req.remote_ip, req.username, req.fields) == (
        lip, rip, user, [f for f in fs if f])


@given(frames(), st.binary(min_size=1, max_size=64))
def test_codec_framing_boundaries(frame, junk):
    """A frame is exactly two LFs, the second one last: every shorter prefix is
    incomplete and refused, anything after it is refused, and an escaped
    value never puts a raw LF (a frame boundary) inside the data line."""
    data, _ = frame
    first = data.index(b"\n")
    assert data.count(b"\n") == 2 and data.endswith(b"\n")
    assert data[:first] == b"VERSION\tscript-login\t1\t0"
    for cut in range(len(data)):
        assert not request_complete(data[:cut])
        with pytest.raises(ProtocolError):
            parse_request(data[:cut])
    assert request_complete(data)
    with pytest.raises(ProtocolError, match="bytes after the request"):
        parse_request(data + junk)


mutations = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "dup"]),
                               st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
                     min_size=1, max_size=6)


def mutate(data: bytes, steps) -> bytes:
    buf = bytearray(data)
    for kind, at, chunk in steps:
        at %= len(buf) + 1
        if kind == "flip" and at < len(buf):
            buf[at] = chunk[0]
        elif kind == "insert":
            buf[at:at] = chunk
        elif kind == "delete":
            del buf[at:at + len(chunk)]
        elif kind == "dup":
            buf[at:at] = buf[at:at + len(chunk) * 4]
    return bytes(buf)


@settings(max_examples=400)
@given(frames(), mutations)
def test_mutated_frames_parse_or_raise_protocol_error(frame, steps):
    """A valid frame with bytes flipped, inserted, deleted or repeated: the
    codec either decodes it into a well-formed request or raises
    ProtocolError -- never any other exception. What it decodes survives
    being written out and read back (the reply path re-escapes it)."""
    data = mutate(frame[0], steps)
    try:
        req = parse_request(data)
    except ProtocolError:
        return
    assert req.username and all(req.fields)
    again = parse_request(build_request(b"", b"", req.username, req.fields))
    assert (again.username, again.fields) == (req.username, req.fields)


def test_mutations_mostly_get_past_the_version_check():
    """The point of fuzzing from valid frames: most mutated inputs reach the
    data-line parser (or decode), rather than stopping at the version line."""
    rnd = random.Random(16)
    reached = 0
    for _ in range(500):
        data = request_bytes(f"u{rnd.randrange(10**6)}@example.com".encode())
        steps = [(rnd.choice(["flip", "insert", "delete", "dup"]), rnd.randrange(10_000),
                  rnd.randbytes(rnd.randrange(1, 8))) for _ in range(rnd.randrange(1, 4))]
        try:
            parse_request(mutate(data, steps))
            reached += 1
        except ProtocolError as exc:
            reached += "version" not in str(exc) and "script-login" not in str(exc)
    assert reached >= 300, reached


@pytest.fixture(scope="module")
def daemon(sqlite_url):
    d = make_daemon(sqlite_url, protocols="imap", request_timeout="1",
                    max_request_bytes="65536")
    d.start()
    yield d
    d.stop()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def assert_alive_and_serving(d) -> None:
    assert d.proc.poll() is None
    assert not send_request(d.sock("imap"), request_bytes(b"canary@example.com")).refused


def raw_attempt(path: str, chunks: list[bytes], nfds: int, half_close: bool,
                pause: float) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    pairs = [socket.socketpair() for _ in range(nfds)]
    try:
        for i, chunk in enumerate(chunks):
            anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                     array.array("i", [b.fileno() for _, b in pairs]))] if i == 0 and pairs
                   else [])
            try:
                s.sendmsg([chunk], anc)
            except (BrokenPipeError, ConnectionResetError):
                break
            if pause:
                time.sleep(pause)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        try:
            return s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return b""
    finally:
        s.close()
        for a, b in pairs:
            a.close()
            b.close()


def mutated(rnd: random.Random) -> bytes:
    base = bytearray(request_bytes(b"fuzz@example.com"))
    kind = rnd.randrange(6)
    if kind == 0:
        return bytes(rnd.randbytes(rnd.randrange(1, 3000)))
    if kind == 1:
        return bytes(base[:rnd.randrange(len(base))])                 # truncated
    if kind == 2:
        for _ in range(rnd.randrange(1, 8)):
            base[rnd.randrange(len(base))] = rnd.randrange(256)
        return bytes(base)
    if kind == 3:                                                      # huge field count
        return build_request(b"1", b"2", b"u", [b"k=v"] * rnd.randrange(1000, 20000))
    if kind == 4:
        return bytes(base) + rnd.randbytes(rnd.randrange(1, 50))        # trailing junk
    return b"\n\n" * rnd.randrange(1, 5)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False), st.integers(0, 3), st.booleans(),
       st.sampled_from([0.0, 0.0, 0.05]))
def test_socket_fuzz_never_crashes_or_leaks(daemon, rnd, nfds, half_close, pause):
    data = mutated(rnd)
    cut = rnd.randrange(1, max(2, len(data)))
    chunks = [data[:cut], data[cut:]] if pause else [data]
    reply = raw_attempt(daemon.sock("imap"), chunks, nfds, half_close, pause)
    # anything but a well-formed request with exactly one fd gets no reply
    try:
        parse_request(data)
        well_formed = True
    except ProtocolError:
        well_formed = False
    if not (well_formed and nfds == 1):
        assert reply == b""
    assert daemon.proc.poll() is None


def test_no_fd_leaks_after_abuse(daemon):
    assert_alive_and_serving(daemon)
    time.sleep(0.3)
    before = open_fds(daemon.proc.pid)
    rnd = random.Random(7)
    for i in range(150):
        raw_attempt(daemon.sock("imap"), [mutated(rnd)], i % 4, bool(i % 2), 0.0)
    for _ in range(50):
        assert not send_request(daemon.sock("imap"), request_bytes()).refused
    time.sleep(1.5)                       # let the 1 s request bound close the stragglers
    assert open_fds(daemon.proc.pid) <= before + 2   # pooled DB connections may differ
    assert_alive_and_serving(daemon)


def test_stalled_connections_do_not_stop_the_others(daemon):
    stalled = []
    for _ in range(200):                  # connect and say nothing, or half a request
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon.sock("imap"))
        if len(stalled) % 2:
            s.send(request_bytes()[:10])
        stalled.append(s)
    try:
        ok, errors = [], []

        def worker(n):
            for i in range(20):
                try:
                    ex = send_request(daemon.sock("imap"), request_bytes(f"w{n}-{i}".encode()))
                    ok.append(not ex.refused)
                except OSError as exc:
                    errors.append(exc)
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and len(ok) == 320 and all(ok)
        assert time.monotonic() - started < 30
    finally:
        for s in stalled:
            s.close()
    assert_alive_and_serving(daemon)
