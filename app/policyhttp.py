"""The HTTP endpoint Dovecot's auth policy client talks to (``policy_listen``).

HTTP/1.1 with keep-alive on the daemon's event loop, as an
``asyncio.Protocol`` (no task, no stream reader per connection: it runs the
same on asyncio's loop and on uvloop). The framing is llhttp's, through
httptools: it refuses what could smuggle a request (Content-Length with
Transfer-Encoding, several or non-numeric lengths, obs-fold, bare LF or CR).
Dovecot 2.3 and 2.4 always send a Content-Length, so a request with
``Transfer-Encoding`` is refused (411): no chunked bodies, hence no trailers
or chunk extensions, whose unfinished lines httptools would buffer without a
bound. Every request is a POST of one JSON object to
any path with ``?command=allow`` or ``?command=report`` (app/attempts.py);
both are answered inside the callback that read the request's last byte
(the check is from memory; a report hands its record to the recorder in a
task of its own), so pipelined requests are answered in order, and the
answers to one read leave in one write. The answer is
``{"status": N, "msg": "..."}`` with HTTP 200.

Requests that are not that get an HTTP error status with the same JSON
shape (status -1) and one log line (at most ``LOG_BURST`` a second per
status; past that they are counted), and the daemon keeps serving: a wrong
or missing API key (401), a body over ``MAX_BODY`` (413, refused from its
Content-Length, without reading it), a head over ``MAX_HEAD`` (431), a
Transfer-Encoding (411), an Upgrade (400), a body
that is not the expected JSON (400), an unknown command (404), another
method (405), an ``Expect`` other than 100-continue (417), a request not
complete within ``request_timeout`` (408), and anything the parser refuses
(400). Dovecot treats any non-2xx answer as the policy server failing, so
its ``auth_policy_reject_on_fail`` decides what the login gets then. After
a 400 for a bad body or a 404 the connection is kept (the body was read
whole); after any other refusal it is closed.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from urllib.parse import parse_qs

import httptools

from .attempts import ALLOW, REPORT, answer, parse_attempt
from .authpolicy import AuthPolicy
from .config import Settings
from .errors import InvalidInput
from .logs import show

log = logging.getLogger("lastlogin.policy")

# Dovecot's request is a few hundred bytes: a 1 KB username is allowed in
# full, and a list of request attributes fits many times over.
MAX_BODY = 16 << 10
MAX_HEAD = 16 << 10
# Data is handed to the parser in slices of at most FEED bytes, so a head
# that never ends is cut once MAX_HEAD + FEED bytes of it have arrived (a
# complete head is measured exactly).
FEED = 4 << 10
# Belt and braces: the bytes fed for one request from its first byte (head,
# body, whatever else the parser might buffer) are bounded whatever the
# parser does with them (413, or 431 while in the head).
MAX_REQUEST = MAX_HEAD + MAX_BODY + 2 * FEED
# A kept-alive connection with nothing to say is closed after this (Dovecot
# reuses its connections within a few seconds or not at all).
IDLE_TIMEOUT = 15.0
# Once a request's first byte arrived, its head and body must be in within
# request_timeout: one deadline for the request, not one per read, so a
# client trickling a byte at a time cannot hold a connection. Deadlines are
# checked by one sweep over the connections every SWEEP seconds, not by a
# timer per request.
SWEEP = 1.0
MAX_CONNECTIONS = 1024      # Dovecot opens at most 100 per auth process
MAX_PER_PEER = 256          # from one address (IPv6: one /64); Dovecot's auth processes
                            # share 127.0.0.1
# Refusal log lines per second and kind (HTTP status, or why a connection
# was refused); past that they are counted, and the count logged.
LOG_BURST = 5

_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            411: "Length Required", 413: "Content Too Large", 417: "Expectation Failed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def response(http: int, body: bytes, close: bool = False) -> bytes:
    """One whole HTTP/1.1 answer with a JSON body."""
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        http, _REASONS.get(http, "").encode(), len(body),
        b"Connection: close\r\n" if close else b"", body)


def peer_group(host: str) -> str:
    """What the per-peer bound counts by: the address, an IPv6 one by its
    /64 (one client usually holds a whole /64 and can use any of it)."""
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


# The answer to nearly every check, built once.
ALLOWED = response(200, answer(0, ""))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
TIMED_OUT = "request not complete within request_timeout"


class Refused(Exception):
    """A request answered with an HTTP error; ``kind``: what its log lines
    are throttled by, beside the status (no client-chosen text)."""

    def __init__(self, http: int, why: str, close: bool = False, kind: str = "") -> None:
        super().__init__(why)
        self.http = http
        self.why = why
        self.close = close
        self.kind = kind


class PolicyServer:
    def __init__(self, settings: Settings, policy: AuthPolicy) -> None:
        self.policy = policy
        self.reconfigure(settings)
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[_Conn, None] = {}     # open connections, in the order they opened
        self._per_peer: dict[str, int] = {}
        self.evicted = 0
        self._closing = False
        self._all_closed: asyncio.Event | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.throttle = _Throttle()

    def reconfigure(self, settings: Settings) -> None:
        self.address = settings.policy_listen
        self.api_key = settings.policy_api_key.encode()
        self.request_timeout = settings.request_timeout

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, _, port = self.address.rpartition(":")
        self._server = await loop.create_server(
            lambda: _Conn(self), host.strip("[]") or "127.0.0.1", int(port),
            reuse_address=True, backlog=1024)
        self._sweeper = loop.call_later(SWEEP, self._sweep)
        bound = ", ".join(str(s.getsockname()[:2]) for s in self._server.sockets)
        log.info("event=policy_listening address=%s bound=%s", self.address, show(bound))

    def close(self) -> None:
        """Stop accepting; close the connections waiting between requests (a
        request being received is answered: ``wait_closed`` waits for it)."""
        if self._server is not None:
            self._server.close()
        self._closing = True
        self._all_closed = asyncio.Event()
        for c in list(self._conns):
            if c.idle:
                self._cut(c)
        if not self._conns:
            self._all_closed.set()

    async def wait_closed(self, timeout: float) -> None:
        """Connections done within ``timeout``; the rest are cut, quietly."""
        if self._conns and self._all_closed is not None:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except TimeoutError:
                pass
        for c in list(self._conns):
            self._cut(c)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.throttle.flush(float("inf"))
        await asyncio.sleep(0)          # the transports' connection_lost callbacks

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # --- connections ------------------------------------------------------------

    def _opened(self, me: _Conn) -> None:
        if self._closing:
            me.transport.abort()
            return
        self._conns[me] = None
        self._per_peer[me.peer] = self._per_peer.get(me.peer, 0) + 1
        refused = self._admit(me)
        if refused is not None:
            if self.throttle.allow(f"connection_refused={refused}"):
                log.warning("event=policy_connection_refused peer=%s reason=%s", me.peer_text,
                            refused)
            if self.policy.metrics:
                self.policy.metrics.policy_connections_refused.labels(refused).inc()
            self._drop(me)
            me.done = True
            close_soon(me.transport)

    def _drop(self, me: _Conn) -> None:
        if me in self._conns:
            del self._conns[me]
            left = self._per_peer[me.peer] - 1
            if left:
                self._per_peer[me.peer] = left
            else:
                del self._per_peer[me.peer]
            if self._closing and not self._conns and self._all_closed is not None:
                self._all_closed.set()

    def _cut(self, me: _Conn) -> None:
        """Close a connection now, unanswered (eviction, idle, shutdown); an
        answer still in its write buffer is let go out when it is small (a
        large one: a client that does not read, it is dropped)."""
        self._drop(me)
        me.done = True
        if me.transport.get_write_buffer_size() > FEED:
            me.transport.abort()
        else:
            close_soon(me.transport)

    def _admit(self, me: _Conn) -> str | None:
        """Room for a new connection: evict one (of this peer when it is over
        its share, of anyone when all are taken); the reason to refuse when
        nothing can be evicted."""
        if self._per_peer[me.peer] > MAX_PER_PEER and not self._evict(
                [c for c in self._conns if c.peer == me.peer and c is not me]):
            return "too_many_from_peer"
        if len(self._conns) > MAX_CONNECTIONS and not self._evict(
                [c for c in self._conns if c is not me]):
            return "too_many"
        return None

    def _evict(self, among: list[_Conn]) -> bool:
        """Close the first of: the oldest idle connection that has not been
        through a request with the API key (``proven``), the oldest unproven
        one busy with a request (its key not yet seen: one byte holds it),
        the oldest idle proven one. A proven connection in the middle of a
        request is never evicted, so connections without the key cannot
        push Dovecot's out. ``among`` is in the order the connections opened."""
        busy = idle = None
        for c in among:
            if c.proven:
                if idle is None and c.idle and not c.paused:
                    idle = c
            elif c.idle and not c.paused:
                victim = c
                break
            elif busy is None:
                busy = c
        else:
            victim = busy or idle
            if victim is None:
                return False
        self._cut(victim)
        self.evicted += 1
        if self.policy.metrics:
            self.policy.metrics.policy_evicted.inc()
        return True

    def _sweep(self) -> None:
        """Once a second: close connections past their deadline (a request
        not complete in time gets 408; an idle one is closed quietly)."""
        try:
            now = time.monotonic()
            for c in list(self._conns):
                if now >= c.deadline:
                    try:
                        c.expire()
                    except Exception as exc:        # a bug of ours: this one is cut
                        log.error("event=policy_expire_failed peer=%s error=%s", c.peer_text,
                                  show(f"{type(exc).__name__}: {exc}"[:300]))
                        self._drop(c)
                        c.done = True
                        c.transport.abort()
            self.throttle.flush(now)
        finally:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP, self._sweep)

    # --- requests -----------------------------------------------------------------

    def refused(self, c: _Conn, exc: Refused) -> bytes:
        """The answer to a refused request, its log line and count."""
        if self.throttle.allow(f"http={exc.http} kind={exc.kind or '-'}"):
            log.warning("event=policy_request_refused peer=%s http=%d reason=%s", c.peer_text,
                        exc.http, show(exc.why[:200]))
        if self.policy.metrics:
            self.policy.metrics.policy_refused.inc()
        return response(exc.http, answer(-1, exc.why[:200]), exc.close)

    def head(self, c: _Conn) -> None:
        """A request's head is in: refuse it now (Refused, the connection is
        then closed) or let its body be read."""
        parser = c.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Refused(400, f"not HTTP/1.1: version {version}", close=True)
        length = expect = None
        keys = []
        for name, value in c.headers:
            name = name.lower()
            if name == b"content-length":
                length = int(value)         # llhttp has checked: digits, given once
            elif name == b"x-api-key" or name == b"authorization":
                keys.append((name, value))
            elif name == b"expect":
                expect = value
            elif name == b"transfer-encoding":
                raise Refused(411, "Transfer-Encoding not accepted (send Content-Length)",
                              close=True)
        method = parser.get_method()
        if method != b"POST":
            raise Refused(405, f"method {method.decode('ascii', 'replace')} (only POST)",
                          close=True)
        if parser.should_upgrade():
            # else llhttp would skip the body, complete the request and stop
            raise Refused(400, "Upgrade not supported", close=True)
        if length is not None and length > MAX_BODY:
            raise Refused(413, f"body of {length} bytes (at most {MAX_BODY})", close=True)
        if self.api_key and not self._key_ok(keys):
            raise Refused(401, "missing or wrong API key", close=True)
        c.command = _command(c.url)
        if expect is not None and version == "1.1":
            if expect.lower() != b"100-continue":
                raise Refused(417, f"Expect: {expect[:40].decode('ascii', 'replace')} "
                                   "(only 100-continue)", close=True)
            if c.command not in (ALLOW, REPORT):
                raise _unknown(c.command, close=True)   # say so before the body is sent
            c.continue_ = True

    def answer(self, c: _Conn) -> bytes:
        """The whole request is in: the answer to it (a refusal keeps the
        connection: the body was read whole)."""
        command = c.command
        if command is not ALLOW and command is not REPORT:
            return self.refused(c, _unknown(command))
        try:
            attempt = parse_attempt(command, c.body)
        except InvalidInput as exc:
            return self.refused(c, Refused(400, f"{exc.field}: {exc.reason}", kind=exc.field))
        if command == ALLOW:
            verdict = self.policy.check(attempt)
            level = logging.INFO if verdict.status < 0 else logging.DEBUG
        else:
            verdict = self.policy.report_nowait(attempt)
            level = logging.DEBUG if attempt.success else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "event=policy_%s user=%s remote_ip=%s service=%s status=%d reason=%s",
                    "check" if command == ALLOW else "report", show(attempt.login[:256]),
                    show(attempt.remote_ip or "-"), show(attempt.service[:40] or "-"),
                    verdict.status, show(verdict.reason))
        if verdict.status == 0 and not verdict.msg:
            return ALLOWED
        return response(200, answer(verdict.status, verdict.msg))

    def _key_ok(self, headers) -> bool:
        """``X-API-Key: <key>``, or ``Authorization: <key>``, ``Authorization:
        Bearer <key>`` or ``Authorization: Basic <key>`` (Dovecot's documented
        form, the key being the base64 text). Whole values are compared in
        constant time; the scheme's case does not matter."""
        key = self.api_key
        for name, value in headers:
            if name == b"x-api-key" and hmac.compare_digest(value, key):
                return True
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                said = scheme.lower() + b" " + token.strip()
                if (hmac.compare_digest(said, b"bearer " + key)
                        | hmac.compare_digest(said, b"basic " + key)
                        | hmac.compare_digest(value, key)):
                    return True
        return False


def _command(target: bytes) -> str:
    """The ``command`` in the request target's query ("" when none)."""
    _, _, query = target.partition(b"?")
    if query == b"command=allow":
        return ALLOW
    if query == b"command=report":
        return REPORT
    command = (parse_qs(query.decode("ascii", "replace")).get("command") or [""])[0]
    return ALLOW if command == ALLOW else REPORT if command == REPORT else command


def _unknown(command: str, close: bool = False) -> Refused:
    return Refused(404, f"command {command[:40]!r} (allow or report)", close=close)


class _Conn(asyncio.Protocol):
    """One connection: its parser's callbacks, its state and deadline.

    ``idle``: no byte of a request is pending; the deadline is then the
    idle one (``request_timeout`` for a new connection, ``IDLE_TIMEOUT``
    after an answer), else the request's. ``proven``: a request of it got
    through ``head()`` (the API key) and was answered. ``paused``: reading
    stopped, its client not reading its answers (not idle then: requests
    may be waiting unread)."""

    __slots__ = ("server", "transport", "parser", "peer", "peer_text", "idle", "since",
                 "deadline", "done", "in_head", "head_size", "fed", "url", "headers", "body",
                 "command", "continue_", "out", "refusal", "proven", "paused")

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.idle = True
        self.proven = self.paused = False
        self.done = False               # answered for the last time, or cut
        self.in_head = self.continue_ = False
        self.fed = self.head_size = 0
        self.url = self.body = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.command = ""
        self.out: list[bytes] = []
        self.refusal: Refused | None = None

    # --- the transport's callbacks --------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer_group(peer[0]) if peer else "?"
        self.peer_text = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.since = time.monotonic()
        self.deadline = self.since + self.server.request_timeout
        self.server._opened(self)

    def connection_lost(self, exc) -> None:
        self.done = True
        self.server._drop(self)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if len(data) <= FEED:
            self._feed(data)
        else:
            for i in range(0, len(data), FEED):
                self._feed(data[i:i + FEED])
                if self.done:
                    break
        if self.out:
            self.transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
            self.out.clear()
        if self.done:
            self.server._drop(self)
            self.transport.close()

    def pause_writing(self) -> None:
        # The client does not read its answers: read no more of its requests.
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if not self.done:
            self.transport.resume_reading()

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.done:
                return          # bytes after a request that closes the connection
            failed = exc.__context__
            if self.refusal is None and failed is not None:
                # not the request's fault: a bug of ours, its one line, this
                # connection ends, the others go on
                if self.server.throttle.allow("request_failed"):
                    log.error("event=policy_request_failed peer=%s error=%s", self.peer_text,
                              show(f"{type(failed).__name__}: {failed}"[:300]))
                self._refuse(Refused(500, "internal error", close=True, kind="internal"))
                return
            self._refuse(self.refusal or Refused(400, f"not HTTP/1.1: {exc}", close=True,
                                                 kind="http"))
            return
        if not self.idle:
            # A request still incomplete: its size so far (and of its head),
            # at most FEED too high (on_message_begin zeroes it, and the
            # slice may have begun with the end of the request before).
            self.fed += len(data)
            if self.in_head and self.fed > MAX_HEAD + FEED:
                self._refuse(Refused(431, f"head over {MAX_HEAD} bytes", close=True))
                return
            if self.fed > MAX_REQUEST:
                self._refuse(Refused(431 if self.in_head else 413,
                                     f"request over {MAX_REQUEST} bytes", close=True))
                return
        if self.continue_ and not self.in_head:
            self.continue_ = False
            self.out.append(CONTINUE)   # the head is accepted, the body not all in

    def _refuse(self, exc: Refused) -> None:
        self.out.append(self.server.refused(self, exc))
        self.done = self.done or exc.close

    def expire(self) -> None:
        """Past the deadline (the sweep): 408 for a request begun, else quietly."""
        self.server._drop(self)
        if not self.idle:
            self.transport.write(self.server.refused(self, Refused(408, TIMED_OUT, True)))
        self.done = True
        if self.transport.get_write_buffer_size() > (0 if self.idle else 4096):
            self.transport.abort()      # a client that does not read its answers
        else:
            close_soon(self.transport)

    # --- the parser's callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self.idle = False
        self.deadline = time.monotonic() + self.server.request_timeout
        self.in_head = True
        self.fed = 0
        self.head_size = 0
        self.url = b""
        self.headers = []
        self.body = b""
        self.command = ""
        self.continue_ = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > MAX_HEAD:
            self._raise(Refused(431, f"head over {MAX_HEAD} bytes", close=True))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD:
            self._raise(Refused(431, f"head over {MAX_HEAD} bytes", close=True))
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        try:
            self.server.head(self)
        except Refused as exc:
            self._raise(exc)

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_BODY:
            self._raise(Refused(413, f"body over {MAX_BODY} bytes", close=True))

    def on_message_complete(self) -> None:
        server = self.server
        close = server._closing or not self.parser.should_keep_alive()
        answer = server.answer(self)
        if close:
            answer = answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            self.done = True
        elif self.parser.get_http_version() == "1.0":
            # kept only because it said keep-alive: say so, or it waits for EOF
            answer = answer.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n", 1)
        self.out.append(answer)
        self.continue_ = False
        self.proven = True
        self.idle = True
        self.since = time.monotonic()
        self.deadline = self.since + IDLE_TIMEOUT
        self.headers = []
        self.body = b""

    def _raise(self, exc: Refused):
        """Stop the parser (it raises its own error, carrying ours)."""
        self.refusal = exc
        raise exc


# A connection closed with an answer still buffered gets this long to take
# it; then it is cut. It no longer counts against MAX_CONNECTIONS, so it must
# not be able to stay open by never reading.
CLOSE_GRACE = 1.0


def close_soon(transport: asyncio.BaseTransport) -> None:
    """Close, letting a small buffered answer go out, but within CLOSE_GRACE."""
    transport.close()
    if transport.get_write_buffer_size():   # type: ignore[attr-defined]
        asyncio.get_running_loop().call_later(CLOSE_GRACE, transport.abort)  # type: ignore[attr-defined]


class _Throttle:
    """Log lines of one kind: at most LOG_BURST a second, then counted; the
    count is logged when the second is over (by the sweep at the latest)."""

    def __init__(self) -> None:
        self._windows: dict[str, list] = {}     # kind -> [start, lines, unlogged]

    def allow(self, kind: str) -> bool:
        now = time.monotonic()
        w = self._windows.get(kind)
        if w is None or now - w[0] >= 1.0:
            if w is not None:
                self._report(kind, w)
            w = self._windows[kind] = [now, 0, 0]
        if w[1] < LOG_BURST:
            w[1] += 1
            return True
        w[2] += 1
        return False

    def flush(self, now: float) -> None:
        for kind, w in list(self._windows.items()):
            if now - w[0] >= 1.0:
                self._report(kind, w)
                del self._windows[kind]

    @staticmethod
    def _report(kind: str, w: list) -> None:
        if w[2]:
            log.warning("event=policy_refusals_not_logged %s count=%d within=1s", kind, w[2])
