"""The HTTP endpoint Dovecot's auth policy client talks to (``policy_listen``).

HTTP/1.1 with keep-alive on the daemon's event loop. The framing is h11's
(a sans-IO parser: this module owns the socket, the bounds and the answers).
Every request is a POST of one JSON object to any path with
``?command=allow`` or ``?command=report`` (app/attempts.py); the answer is
``{"status": N, "msg": "..."}`` with HTTP 200.

Requests that are not that get an HTTP error status with the same JSON
shape (status -1) and one log line, and the daemon keeps serving: a wrong or
missing API key (401), a body over ``MAX_BODY`` (413), a body that is not the
expected JSON (400), an unknown command (404), another method (405).
Dovecot treats any non-2xx answer as the policy server failing, so its
``auth_policy_reject_on_fail`` decides what the login gets then. A request
whose body was read whole keeps its connection; otherwise it is closed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from urllib.parse import parse_qs, urlsplit

import h11

from .attempts import ALLOW, answer, parse_attempt
from .authpolicy import AuthPolicy, Verdict
from .config import Settings
from .errors import InvalidInput
from .logs import show

log = logging.getLogger("lastlogin.policy")

# Dovecot's request is a few hundred bytes: a 1 KB username is allowed in
# full, and a list of request attributes fits many times over.
MAX_BODY = 16 << 10
MAX_HEAD = 16 << 10
# A kept-alive connection with nothing to say is closed after this (Dovecot
# reuses its connections within a few seconds or not at all).
IDLE_TIMEOUT = 15.0
# Once a request's first byte arrived, its head and body must be in within
# request_timeout: one deadline for the request, not one per read, so a
# client trickling a byte at a time cannot hold a connection.
MAX_CONNECTIONS = 1024      # Dovecot opens at most 100 per auth process
MAX_PER_PEER = 256          # from one address; Dovecot's auth processes share 127.0.0.1


class Refused(Exception):
    def __init__(self, http: int, why: str, close: bool = False) -> None:
        super().__init__(why)
        self.http = http
        self.why = why
        self.close = close


class _Conn:
    """One open connection: who, and whether it is between requests."""

    __slots__ = ("peer", "writer", "idle", "since", "task")

    def __init__(self, peer: str, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.writer = writer
        self.idle = True            # no byte of a request yet: may be evicted
        self.since = time.monotonic()
        self.task = asyncio.current_task()


class PolicyServer:
    def __init__(self, settings: Settings, policy: AuthPolicy) -> None:
        self.policy = policy
        self.reconfigure(settings)
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[int, _Conn] = {}      # by id(), in the order they opened
        self.evicted = 0
        self._closing = False

    def reconfigure(self, settings: Settings) -> None:
        self.address = settings.policy_listen
        self.api_key = settings.policy_api_key.encode()
        self.request_timeout = settings.request_timeout

    async def start(self) -> None:
        host, _, port = self.address.rpartition(":")
        self._server = await asyncio.start_server(
            self._connection, host.strip("[]") or "127.0.0.1", int(port),
            reuse_address=True, backlog=1024)
        bound = ", ".join(str(s.getsockname()[:2]) for s in self._server.sockets)
        log.info("event=policy_listening address=%s bound=%s", self.address, show(bound))

    def close(self) -> None:
        """Stop accepting; close the connections waiting between requests (a
        request being answered finishes: ``wait_closed`` waits for it)."""
        if self._server is not None:
            self._server.close()
        self._closing = True
        for c in list(self._conns.values()):
            if c.idle:
                c.writer.transport.abort()

    async def wait_closed(self, timeout: float) -> None:
        """Connections done within ``timeout``; the rest are cut, quietly."""
        tasks = [c.task for c in self._conns.values() if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for c in list(self._conns.values()):
                c.writer.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # --- one connection ---------------------------------------------------------

    def _admit(self, me: _Conn) -> str | None:
        """Room for a new connection: evict the oldest idle one (of this peer
        when it is over its share, of anyone when all are taken); the reason
        to refuse when nothing can be evicted."""
        mine = [c for c in self._conns.values() if c.peer == me.peer and c is not me]
        if len(mine) >= MAX_PER_PEER and not self._evict(mine):
            return "too_many_from_peer"
        if len(self._conns) > MAX_CONNECTIONS and not self._evict(
                [c for c in self._conns.values() if c is not me]):
            return "too_many"
        return None

    def _evict(self, among: list[_Conn]) -> bool:
        idle = [c for c in among if c.idle]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.since)
        oldest.idle = False
        self._conns.pop(id(oldest), None)
        oldest.writer.transport.abort()
        self.evicted += 1
        return True

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if peer else "?"
        me = _Conn(peer[0] if peer else "?", writer)
        self._conns[id(me)] = me
        try:
            if self._closing:
                return
            refused = self._admit(me)
            if refused is not None:
                log.warning("event=policy_connection_refused peer=%s reason=%s", peer_text,
                            refused)
                return
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            first = True
            while await self._one(conn, reader, writer, peer_text, me, first):
                conn.start_next_cycle()
                first = False
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass                # shutdown: the connection is simply closed
        finally:
            self._conns.pop(id(me), None)
            writer.close()

    async def _one(self, conn: h11.Connection, reader, writer, peer: str, me: _Conn,
                   first: bool) -> bool:
        """One request and its answer; False when the connection is done."""
        try:
            # Between requests: wait for a first byte (a new connection gets
            # request_timeout, a kept-alive one IDLE_TIMEOUT); from then on
            # one deadline covers the whole request.
            me.idle, me.since = True, time.monotonic()
            wait = self.request_timeout if first else IDLE_TIMEOUT
            if conn.next_event() is h11.NEED_DATA:
                async with asyncio.timeout(wait):
                    data = await reader.read(65536)
                conn.receive_data(data)
            me.idle = False
            if self._conns.get(id(me)) is not me:
                return False            # evicted meanwhile
            async with asyncio.timeout(self.request_timeout):
                event = await _next(conn, reader)
                if isinstance(event, h11.ConnectionClosed):
                    return False
                assert isinstance(event, h11.Request), event
                verdict = await self._serve(conn, reader, event)
        except Refused as exc:
            log.warning("event=policy_request_refused peer=%s http=%d reason=%s", peer,
                        exc.http, show(exc.why[:200]))
            if self.policy.metrics:
                self.policy.metrics.policy_refused.inc()
            return await _send(conn, writer, exc.http, answer(-1, exc.why[:200]),
                               close=exc.close)
        except h11.RemoteProtocolError as exc:
            log.warning("event=policy_request_refused peer=%s http=400 reason=%s", peer,
                        show(f"not HTTP/1.1: {exc}"[:200]))
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(conn, writer, 400, answer(-1, "malformed HTTP request"), close=True)
            return False
        except TimeoutError:
            if not me.idle:
                log.warning("event=policy_request_refused peer=%s http=408 reason=%s", peer,
                            "request not complete within request_timeout")
            return False
        return await _send(conn, writer, 200, answer(verdict.status, verdict.msg))

    async def _serve(self, conn: h11.Connection, reader, request: h11.Request) -> Verdict:
        if request.method != b"POST":
            raise Refused(405, f"method {request.method.decode('ascii', 'replace')} "
                               "(only POST)", close=True)
        length = _content_length(request.headers)
        if length is not None and length > MAX_BODY:
            raise Refused(413, f"body of {length} bytes (at most {MAX_BODY})", close=True)
        if self.api_key and not self._key_ok(request.headers):
            raise Refused(401, "missing or wrong API key", close=True)
        body = bytearray()
        while True:
            event = await _next(conn, reader)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise Refused(413, f"body over {MAX_BODY} bytes", close=True)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise Refused(400, "connection ended inside the body", close=True)
        query = parse_qs(urlsplit(request.target.decode("ascii", "replace")).query)
        command = (query.get("command") or [""])[0]
        if command not in ("allow", "report"):
            raise Refused(404, f"command {command[:40]!r} (allow or report)")
        try:
            attempt = parse_attempt(command, bytes(body))
        except InvalidInput as exc:
            raise Refused(400, f"{exc.field}: {exc.reason}") from None
        if command == ALLOW:
            verdict = self.policy.check(attempt)
            level = logging.INFO if verdict.status < 0 else logging.DEBUG
        else:
            verdict = await self.policy.report(attempt)
            level = logging.DEBUG if attempt.success else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "event=policy_%s user=%s remote_ip=%s service=%s status=%d reason=%s",
                    "check" if command == ALLOW else "report", show(attempt.login[:256]),
                    show(attempt.remote_ip or "-"), show(attempt.service[:40] or "-"),
                    verdict.status, show(verdict.reason))
        return verdict

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


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)       # h11 has checked it is a number
    return None


async def _next(conn: h11.Connection, reader: asyncio.StreamReader):
    """The next event; the caller's deadline bounds the wait."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await reader.read(65536)
        conn.receive_data(data)         # b"": the peer closed


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                body: bytes, close: bool = False) -> bool:
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if close:
        headers.append(("Connection", "close"))
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    writer.write(data)
    await writer.drain()
    return not close and conn.our_state is h11.DONE and conn.their_state is h11.DONE
