"""The baseline: a post-login handler that does nothing but answer.

Reads the request (with its fd), closes the fd, echoes the username and
fields back. No decision, no database. Same asyncio/recvmsg style as
lastlogin, so the difference between the two is lastlogin's own work.

    python -m bench.null_handler SOCKET_PATH
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

from app.fdio import close_all, read_message, send_all
from app.protocol import build_reply, parse_request, request_complete


async def handle(conn: socket.socket) -> None:
    fds: list[int] = []
    try:
        req = parse_request(await read_message(conn, 1 << 20, fds, request_complete, "request"))
        close_all(fds)
        await send_all(conn, build_reply(req.username, req.fields))
    except (OSError, ValueError):
        pass
    finally:
        close_all(fds)
        conn.close()


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)
        sock.listen(1024)
        sock.setblocking(False)
        print("READY", flush=True)
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            loop.create_task(handle(conn))


if __name__ == "__main__":
    try:
        asyncio.run(serve(sys.argv[1]))
    except KeyboardInterrupt:
        pass
    finally:
        if os.path.exists(sys.argv[1]):
            os.unlink(sys.argv[1])
