"""The baselines: a post-login handler that does nothing but answer, and
the cheapest one that commits every login before it answers.

Reads the request (with its fd), closes the fd, echoes the username and
fields back. No decision, no database. Same asyncio/recvmsg style as
lastlogin, so the difference between the two is lastlogin's own work.

With --commit CONNINFO (the commit floor), each login's username is first
stored in PostgreSQL and committed, and only then answered: one table of
one column without an index (bench_commit_floor), group commit from the
event loop as lastlogin's lane does it (one statement in flight on one
connection, autocommit, the usernames of every login that arrived
meanwhile in one INSERT, the server's default synchronous_commit), no
decision and no record beyond the name. No handler that keeps the issue's
rule -- every login committed before its reply -- can do less per login,
so what lastlogin costs above it is lastlogin's own, and what the floor
costs above the do-nothing handler is the rule's.

    python -m bench.null_handler SOCKET_PATH [--commit CONNINFO]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import stat

from app.fdio import close_all, read_message, send_all
from app.protocol import build_reply, parse_request, request_complete


class CommitFloor:
    """Group commit of usernames from the event loop: one INSERT in flight."""

    def __init__(self, conn) -> None:   # psycopg.AsyncConnection, autocommit
        self.conn = conn
        self.queued: list[tuple[bytes, asyncio.Future]] = []
        self.busy = False

    def commit(self, username: bytes) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.queued.append((username, fut))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._run())
        return fut

    async def _run(self) -> None:
        try:
            while self.queued:
                batch, self.queued = self.queued, []
                try:
                    await self.conn.execute(
                        "INSERT INTO bench_commit_floor (username) SELECT unnest(%s::bytea[])",
                        ([name for name, _ in batch],), prepare=True)
                except Exception as exc:  # noqa: BLE001 - those logins get no reply
                    for _, fut in batch:
                        fut.set_exception(exc)
                    continue
                for _, fut in batch:
                    fut.set_result(None)
        finally:
            self.busy = False


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


async def serve(path: str, conninfo: str | None) -> None:
    loop = asyncio.get_running_loop()
    floor = None
    if conninfo is not None:
        import psycopg

        db = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        await db.execute("CREATE TABLE IF NOT EXISTS bench_commit_floor (username bytea NOT NULL)")
        floor = CommitFloor(db)
    with socket.socket(socket.AF_UNIX) as sock:
        if stat.S_ISSOCK(os.lstat(path).st_mode if os.path.lexists(path) else 0):
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
