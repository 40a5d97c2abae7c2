"""Faults injected for real into a database: locks, rows it refuses, a
network between us and it that segments replies or goes silent."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time

from sqlalchemy.engine import make_url

from app.db import make_engine


def hold_lock(url: str):
    """A transaction that holds last_logins (PostgreSQL) or the whole file
    (SQLite): every write waits behind it. Returns the function that lets go."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(make_url(url).database, timeout=5)
        conn.isolation_level = None
        conn.execute("BEGIN EXCLUSIVE")
        return conn.rollback
    engine = make_engine(url)
    conn = engine.connect()
    tx = conn.begin()
    conn.exec_driver_sql("LOCK TABLE last_logins IN ACCESS EXCLUSIVE MODE")

    def release():
        tx.rollback()
        conn.close()
        engine.dispose()
    return release


def reject_rows(url: str, name: str, on: bool, how: str = "check") -> None:
    """Make the database itself refuse login_events rows for ``name``.

    how="check": a CHECK constraint on PostgreSQL (SQLSTATE 23514), a trigger
    on SQLite; how="raise": a trigger that raises a plain exception
    (PostgreSQL P0001: not a data error, the database's own reason).
    """
    engine = make_engine(url)
    pg = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        if not pg:
            conn.exec_driver_sql(
                "CREATE TRIGGER trg_test_reject BEFORE INSERT ON login_events "
                f"WHEN NEW.username = '{name}' BEGIN SELECT RAISE(ABORT, 'rejected'); END"
                if on else "DROP TRIGGER trg_test_reject")
        elif how == "check":
            conn.exec_driver_sql(
                "ALTER TABLE login_events ADD CONSTRAINT ck_test_reject "
                f"CHECK (username <> '{name}') NOT VALID" if on else
                "ALTER TABLE login_events DROP CONSTRAINT ck_test_reject")
        elif on:
            conn.exec_driver_sql(f"""
                CREATE FUNCTION test_reject() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.username = '{name}' THEN RAISE EXCEPTION 'refused by a trigger'; END IF;
                    RETURN NEW;
                END $$""")
            conn.exec_driver_sql("CREATE TRIGGER trg_test_reject BEFORE INSERT ON login_events "
                                 "FOR EACH ROW EXECUTE FUNCTION test_reject()")
        else:
            conn.exec_driver_sql("DROP TRIGGER trg_test_reject ON login_events")
            conn.exec_driver_sql("DROP FUNCTION test_reject()")
    engine.dispose()


def slow_commits(url: str, seconds: float, on: bool) -> None:
    """PostgreSQL: every insert into login_events sleeps, without holding a
    lock anyone waits for -- a commit that lands late (not one cancelled)."""
    engine = make_engine(url)
    with engine.begin() as conn:
        if on:
            conn.exec_driver_sql(f"""
                CREATE FUNCTION test_slow() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$""")
            conn.exec_driver_sql("CREATE TRIGGER trg_test_slow AFTER INSERT ON login_events "
                                 "FOR EACH STATEMENT EXECUTE FUNCTION test_slow()")
        else:
            conn.exec_driver_sql("DROP TRIGGER trg_test_slow ON login_events")
            conn.exec_driver_sql("DROP FUNCTION test_slow()")
    engine.dispose()


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port``.

    ``chunk``/``delay``: the server's bytes are handed on ``chunk`` at a
    time, ``delay`` apart (a segmenting network, a middlebox): a reply then
    reaches the client over several reads.

    ``silence(replies_only)``: every connection open at that moment, and
    every one opened while silent, goes quiet for good -- the bytes are
    read and thrown away, nothing is closed (a host gone without a word, a
    partition, with the client's kernel still seeing its data acknowledged).
    With ``replies_only`` the client's bytes still reach the server, which
    does the work, but no answer ever comes back. ``speak()``: connections
    opened from then on pass again; the silenced ones stay silent.
    """

    def __init__(self, target_port: int, chunk: int = 1 << 20, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.chunk, self.delay = chunk, delay
        self._lsock = socket.socket()
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self.port = self._lsock.getsockname()[1]
        self._socks = [self._lsock]
        self._lock = threading.Lock()
        self._silent: str | None = None         # what new connections get: None, "replies", "all"
        self._modes: dict[int, str] = {}        # connection -> how it was silenced
        self._next = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def silence(self, replies_only: bool = False) -> None:
        with self._lock:
            self._silent = "replies" if replies_only else "all"
            for conn in range(self._next):
                self._modes.setdefault(conn, self._silent)

    def speak(self) -> None:
        with self._lock:
            self._silent = None

    def _quiet(self, conn: int, reply: bool) -> bool:
        mode = self._modes.get(conn)
        return mode == "all" or (mode == "replies" and reply)

    def _pump(self, conn: int, src, dst, reply: bool) -> None:
        size, pause = (self.chunk, self.delay) if reply else (1 << 20, 0.0)
        try:
            while data := src.recv(65536):
                if self._quiet(conn, reply):
                    continue                    # swallowed
                for i in range(0, len(data), size):
                    dst.sendall(data[i:i + size])
                    if pause:
                        time.sleep(pause)
        except OSError:
            pass
        finally:
            if not self._quiet(conn, reply):    # (a silent network passes no FIN)
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._socks.extend((client, server))
                conn, self._next = self._next, self._next + 1
                if self._silent is not None:
                    self._modes[conn] = self._silent
            threading.Thread(target=self._pump, args=(conn, client, server, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, server, client, True),
                             daemon=True).start()

    def stop(self) -> None:
        for sock in self._socks:
            try:
                sock.close()
            except OSError:
                pass
