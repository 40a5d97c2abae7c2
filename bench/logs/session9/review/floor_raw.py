"""bench/null_handler.py --commit, but its group commit done the way lastlogin's
lane (app/lane.py) does it: psycopg.pq directly, one prepared statement sent
with send_query_prepared on a non-blocking connection, its socket read by one
permanent add_reader -- no AsyncConnection, no cursor, no per-statement lock or
Transformer. Same table, same statement text, same autocommit (each statement
its own transaction), same reply only after the result says COMMAND_OK.

    python floor_raw.py SOCKET_PATH CONNINFO
"""
from __future__ import annotations

import asyncio
import os
import socket
import sys

import psycopg
from psycopg import pq

from bench.null_handler import handle

SQL = b"INSERT INTO bench_commit_floor (username) SELECT unnest($1::bytea[])"


def literal(names: list[bytes]) -> bytes:
    # a text bytea[] literal: {"\\x6162",...}
    return b"{" + b",".join(b'"\\\\x' + n.hex().encode() + b'"' for n in names) + b"}"


class RawFloor:
    def __init__(self, conn: psycopg.Connection, loop) -> None:
        self.conn = conn             # kept alive
        self.pg = conn.pgconn
        self.loop = loop
        res = self.pg.prepare(b"floor", SQL, None)
        assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
        self.pg.nonblocking = 1
        self.queued: list[tuple[bytes, asyncio.Future]] = []
        self.inflight: list[tuple[bytes, asyncio.Future]] | None = None
        self.results = []
        loop.add_reader(self.pg.socket, self._readable)

    def commit(self, username: bytes) -> asyncio.Future:
        fut = self.loop.create_future()
        self.queued.append((username, fut))
        if self.inflight is None:
            self._send()
        return fut

    def _send(self) -> None:
        batch, self.queued = self.queued, []
        self.inflight = batch
        self.pg.send_query_prepared(b"floor", [literal([n for n, _ in batch])])
        while self.pg.flush():
            pass

    def _readable(self) -> None:
        self.pg.consume_input()
        while self.inflight is not None and not self.pg.is_busy():
            res = self.pg.get_result()
            if res is not None:
                self.results.append(res)
                continue
            batch, self.inflight = self.inflight, None
            ok = bool(self.results) and all(
                r.status == pq.ExecStatus.COMMAND_OK for r in self.results)
            err = None if ok else RuntimeError(
                b" ".join(r.error_message for r in self.results).decode(errors="replace"))
            self.results = []
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None) if ok else fut.set_exception(err)
            if self.queued:
                self._send()


async def serve(path: str, conninfo: str) -> None:
    loop = asyncio.get_running_loop()
    db = psycopg.Connection.connect(conninfo, autocommit=True)
    db.execute("CREATE TABLE IF NOT EXISTS bench_commit_floor (username bytea NOT NULL)")
    floor = RawFloor(db, loop)
    if os.path.exists(path):
        os.unlink(path)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)
        sock.listen(1024)
        sock.setblocking(False)
        print("READY", flush=True)
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            loop.create_task(handle(conn, floor))


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
