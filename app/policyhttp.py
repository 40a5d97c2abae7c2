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
IDLE_TIMEOUT = 75.0         # a kept-alive connection with nothing to say (Dovecot: 10 s)
MAX_CONNECTIONS = 1024      # Dovecot opens at most 100 per auth process


class Refused(Exception):
    def __init__(self, http: int, why: str, close: bool = False) -> None:
        super().__init__(why)
        self.http = http
        self.why = why
        self.close = close


class PolicyServer:
    def __init__(self, settings: Settings, policy: AuthPolicy) -> None:
        self.policy = policy
        self.reconfigure(settings)
        self._server: asyncio.AbstractServer | None = None
        self._open = 0

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
        if self._server is not None:
            self._server.close()

    # --- one connection ---------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                log.warning("event=policy_connection_refused peer=%s reason=too_many", peer_text)
                return
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
            while await self._one(conn, reader, writer, peer_text):
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open -= 1
            writer.close()

    async def _one(self, conn: h11.Connection, reader, writer, peer: str) -> bool:
        """One request and its answer; False when the connection is done."""
        try:
            event = await _next(conn, reader, IDLE_TIMEOUT)
            if isinstance(event, h11.ConnectionClosed):
                return False
            assert isinstance(event, h11.Request), event
            async with asyncio.timeout(self.request_timeout):
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
            if conn.their_state is not h11.IDLE:
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
            event = await _next(conn, reader, self.request_timeout)
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
        for name, value in headers:
            if name == b"x-api-key" and hmac.compare_digest(value, self.api_key):
                return True
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(),
                                                                       self.api_key):
                    return True
        return False


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)       # h11 has checked it is a number
    return None


async def _next(conn: h11.Connection, reader: asyncio.StreamReader, timeout: float):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        async with asyncio.timeout(timeout):
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
