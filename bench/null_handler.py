"""The baselines: a post-login handler that does nothing but answer, and
the cheapest one that commits every login before it answers.

Reads the request (with its fd), closes the fd, echoes the username and
fields back. No decision, no database. Same asyncio/recvmsg style as
lastlogin, so the difference between the two is lastlogin's own work.

With --commit CONNINFO (the commit floor), each login's username is first
stored in PostgreSQL and committed, and only then answered: one table of
one column without an index (bench_commit_floor), group commit from the
event loop the way lastlogin's lane sends its commits (psycopg.pq, one
prepared statement in flight on one connection, autocommit, the usernames
of every login that arrived meanwhile in one INSERT, the server's default
synchronous_commit), no decision and no record beyond the name: what the
issue's rule -- every login committed before its reply -- costs at the
least, written as lastlogin writes. What lastlogin costs above it is its
own; what the floor costs above the do-nothing handler is the rule's.

    python -m bench.null_handler SOCKET_PATH [--commit CONNINFO]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import stat

import psycopg
from psycopg import pq

from app.fdio import close_all, read_message, send_all
from app.protocol import build_reply, parse_request, request_complete


INSERT = b"INSERT INTO bench_commit_floor (username) SELECT unnest($1::bytea[])"


class CommitFloor:
    """Group commit of usernames from the event loop, one INSERT in flight,
    sent as lastlogin's lane sends its statement: ``psycopg.pq`` directly,
    one prepared statement, the result read when the socket is readable (no
    cursor, no AsyncConnection: their Python would be the floor's cost, not
    the rule's). A login is answered only after its INSERT reported success."""

    def __init__(self, conn, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn                # psycopg.Connection, autocommit: kept open
        self.pg = conn.pgconn
        self.loop = loop
        res = self.pg.prepare(b"floor", INSERT)
        if res.status != pq.ExecStatus.COMMAND_OK:
            raise RuntimeError(res.error_message.decode(errors="replace"))
        self.queued: list[tuple[bytes, asyncio.Future]] = []
        self.inflight: list[tuple[bytes, asyncio.Future]] | None = None
        self.results: list = []
        loop.add_reader(self.pg.socket, self._readable)

    def commit(self, username: bytes) -> asyncio.Future:
        fut = self.loop.create_future()
        self.queued.append((username, fut))
        if self.inflight is None:
            self._send()
        return fut

    def _send(self) -> None:
        self.inflight, self.queued = self.queued, []
        # a bytea[] in text form: {"\\x6162",...}; sent whole (a blocking connection)
        names = b",".join(b'"\\\\x' + name.hex().encode() + b'"' for name, _ in self.inflight)
        self.pg.send_query_prepared(b"floor", [b"{" + names + b"}"])

    def _readable(self) -> None:
        self.pg.consume_input()
        while self.inflight is not None and not self.pg.is_busy():
            res = self.pg.get_result()
            if res is not None:
                self.results.append(res)
                continue
            batch, self.inflight = self.inflight, None
            results, self.results = self.results, []
            failed = [r for r in results if r.status != pq.ExecStatus.COMMAND_OK]
            err = RuntimeError(b" ".join(r.error_message for r in failed).decode(
                errors="replace")) if failed or not results else None
            for _, fut in batch:
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)
            if self.queued:
                self._send()


async def handle(conn: socket.socket, floor: CommitFloor | None) -> None:
    fds: list[int] = []
    try:
        req = parse_request(await read_message(conn, 1 << 20, fds, request_complete, "request"))
        close_all(fds)
        if floor is not None:
            await floor.commit(req.username)
        await send_all(conn, build_reply(req.username, req.fields))
    except Exception:  # noqa: BLE001 - that login gets no reply; the next goes on
        pass
    finally:
        close_all(fds)
        conn.close()


def stale(path: str) -> bool:
    """A socket file at ``path`` that nothing listens on."""
    if not (os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode)):
        return False
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
    return False


async def serve(path: str, conninfo: str | None) -> None:
    loop = asyncio.get_running_loop()
    floor = None
    if conninfo is not None:
        db = psycopg.Connection.connect(conninfo, autocommit=True)
        db.execute("CREATE TABLE IF NOT EXISTS bench_commit_floor (username bytea NOT NULL)")
        floor = CommitFloor(db, loop)
    with socket.socket(socket.AF_UNIX) as sock:
        if stale(path):
            os.unlink(path)     # left by a handler ended by SIGTERM (no cleanup then)
        sock.bind(path)
        sock.listen(1024)
        sock.setblocking(False)
        print("READY", flush=True)
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            loop.create_task(handle(conn, floor))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("socket")
    ap.add_argument("--commit", metavar="CONNINFO",
                    help="commit each username to this PostgreSQL database before answering")
    args = ap.parse_args()
    try:
        asyncio.run(serve(args.socket, args.commit))
    except KeyboardInterrupt:
        pass
    finally:
        if os.path.exists(args.socket):
            os.unlink(args.socket)
