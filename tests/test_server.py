"""The daemon as a real process, spoken to the way Dovecot speaks to it."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.schema import last_logins, login_events
from app.protocol import build_reply, parse_reply
from tests.builders import HOSTILE_USERNAMES, request_bytes, request_fields
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.postlogin import send_request


@pytest.fixture
def daemon(db_url):
    d = make_daemon(db_url, request_timeout="1", protocols="imap,pop3")
    d.start()
    yield d
    d.stop()


def rows(db_url, table=login_events):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        out = conn.execute(sa.select(table)).all()
    engine.dispose()
    return out


def test_login_is_recorded_and_fields_echoed(daemon, db_url):
    fields = request_fields()
    ex = send_request(daemon.sock("imap"), request_bytes(fields=fields))
    assert ex.reply == build_reply(b"alice@example.com", fields)
    # the daemon closed its copy of the client fd, and wrote nothing to it
    assert ex.client_saw() == b""
    (ev,) = rows(db_url)
    assert (ev.username, ev.protocol, ev.remote_ip, ev.local_ip, ev.outcome, ev.auth_mech) == (
        "alice@example.com", "imap", "198.51.100.7", "192.0.2.25", "allowed", "PLAIN")
    # the record was committed before the reply: it is there the moment we look
    (last,) = rows(db_url, last_logins)
    assert last.login_count == 1


def test_protocol_comes_from_the_socket_and_count_grows(daemon, db_url):
    send_request(daemon.sock("imap"), request_bytes())
    send_request(daemon.sock("pop3"), request_bytes())
    send_request(daemon.sock("pop3"), request_bytes(remote_ip=b"2001:db8::42", local_ip=b""))
    by = {(r.protocol): r for r in rows(db_url, last_logins)}
    assert by["imap"].login_count == 1 and by["pop3"].login_count == 2
    assert by["pop3"].last_remote_ip == "2001:db8::42" and by["pop3"].last_local_ip is None


def test_auth_token_is_never_stored_or_logged(daemon, db_url):
    token = b"3f2a0c9e5b7d41e08a6c2f1b9d3e7a5c4b8f0e12"
    ex = send_request(daemon.sock("imap"), request_bytes())
    assert token in ex.reply              # Dovecot still gets it back
    (ev,) = rows(db_url)
    assert token.decode() not in repr(tuple(ev))
    assert token.decode() not in daemon.logs()


@pytest.mark.parametrize("name", HOSTILE_USERNAMES, ids=range(len(HOSTILE_USERNAMES)))
def test_hostile_usernames_round_trip(daemon, db_url, name):
    fields = [b"uid=1000", b"home=/h/" + name, b"x=';DROP TABLE last_logins;--\t\\"]
    ex = send_request(daemon.sock("imap"), request_bytes(name, fields=fields))
    assert parse_reply(ex.reply) == (name, fields)
    (ev,) = rows(db_url)
    assert (ev.username_raw or ev.username.encode()) == name
    assert len(rows(db_url, last_logins)) == 1


@pytest.mark.parametrize("case", ["no_fd", "two_fds", "garbage", "wrong_version",
                                  "truncated_then_close", "oversized", "silent", "slow_drip"])
def test_bad_connections_end_without_reply_and_others_go_on(daemon, db_url, case):
    path = daemon.sock("imap")
    if case == "no_fd":
        ex = send_request(path, request_bytes(), fds=0)
    elif case == "two_fds":
        ex = send_request(path, request_bytes(), fds=2)
    elif case == "garbage":
        ex = send_request(path, os.urandom(3000) + b"\n\n")
    elif case == "wrong_version":
        ex = send_request(path, request_bytes().replace(b"\t1\t0\n", b"\t2\t0\n", 1))
    elif case == "oversized":
        ex = send_request(path, b"VERSION\tscript-login\t1\t0\n" + b"x" * (1 << 20) + b"\n")
    if case in ("truncated_then_close", "silent", "slow_drip"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.settimeout(10)
        started = time.monotonic()
        if case == "truncated_then_close":
            s.sendall(request_bytes()[:40])
            s.shutdown(socket.SHUT_WR)
        elif case == "slow_drip":
            try:
                for b in request_bytes()[:40]:      # 4 s of dripping, bound is 1 s
                    s.send(bytes([b]))
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass                                # cut off mid-drip, as it should be
        try:
            said = s.recv(100)
        except ConnectionResetError:
            said = b""                      # closed with our bytes unread: a reset
        assert said == b""                  # closed, no reply
        assert time.monotonic() - started < 6   # the 1 s request bound, plus slack
        s.close()
    else:
        assert ex.reply == b"" and ex.client_saw() == b""
    assert rows(db_url) == []
    assert "event=connection_refused" in daemon.logs()
    # the daemon is still there for the next login
    assert not send_request(path, request_bytes()).refused
    assert len(rows(db_url)) == 1


def test_foreign_uid_is_refused(db_url):
    d = make_daemon(db_url, protocols="imap", socket_mode="0666", allowed_uids="0")
    d.start()
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                      # child: become nobody, then try a login
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(10)
                s.connect(d.sock("imap"))
                try:
                    s.sendall(request_bytes())
                except BrokenPipeError:
                    pass                  # refused before it finished sending
                try:
                    got = s.recv(100)
                except ConnectionResetError:
                    got = b""             # closed with our request unread
                os.write(w, repr(got).encode())
            except BaseException as exc:  # noqa: BLE001 - report to the parent
                os.write(w, repr(exc).encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        assert os.read(r, 100) == b"b''"   # closed without a reply
        os.close(r)
        assert "peer uid 65534 is not allowed" in d.logs()
        assert rows(db_url) == []
    finally:
        d.stop()


def test_concurrent_logins_share_commits(daemon, db_url):
    n = 64
    results = []
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        results.append(send_request(daemon.sock("imap"),
                                    request_bytes(f"user{i}@example.com".encode())))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == n and not any(r.refused for r in results)
    assert len(rows(db_url)) == n and len(rows(db_url, last_logins)) == n
    assert daemon.stop() == 0
    line = [ln for ln in daemon.logs().splitlines() if "event=stopped" in ln][-1]
    commits = int(line.split("commits=")[1].split()[0])
    assert commits < n, line      # group commit: logins shared transactions


def test_sockets_are_created_with_mode_and_removed_on_exit(daemon):
    path = daemon.sock("imap")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert daemon.stop() == 0
    assert not os.path.exists(path) and not os.path.exists(daemon.sock("pop3"))
    assert "event=draining" in daemon.logs()


def test_stale_socket_is_replaced_but_a_live_one_is_not(db_url):
    d = make_daemon(db_url, protocols="imap")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(d.sock("imap"))
    stale.close()                       # a socket file nobody answers on
    d.start()
    try:
        assert not send_request(d.sock("imap"), request_bytes()).refused
        twin = make_daemon(db_url, protocols="imap")
        twin.env["LASTLOGIN_SOCKET_DIR"] = d.socket_dir
        out = subprocess.run([sys.executable, "-m", "app", "serve"], env=twin.env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2
        assert "in use by another process" in out.stderr
        assert not send_request(d.sock("imap"), request_bytes()).refused
    finally:
        d.stop()


def test_drain_finishes_inflight_login(daemon, db_url):
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.sock("imap"))
    # half a request, then SIGTERM, then the rest: the login still completes
    req = request_bytes()
    a, b = socket.socketpair()
    import array
    s.sendmsg([req[:30]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [b.fileno()]))])
    time.sleep(0.2)
    daemon.signal(signal.SIGTERM)
    time.sleep(0.2)
    s.sendall(req[30:])
    s.settimeout(10)
    assert s.recv(65536).endswith(b"\n")
    assert daemon.proc.wait(20) == 0
    assert len(rows(db_url)) == 1


def test_sighup_reloads_settings(db_url, tmp_path):
    cfg = tmp_path / "ll.toml"
    cfg.write_text('allowed_uids = [1]\nprotocols = ["imap"]\n')
    d = make_daemon(db_url)
    d.config_path = str(cfg)
    d.start()
    try:
        assert send_request(d.sock("imap"), request_bytes()).refused    # root not allowed
        cfg.write_text('allowed_uids = [0]\nprotocols = ["imap"]\n')
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: "event=reloaded" in d.logs())
        assert not send_request(d.sock("imap"), request_bytes()).refused
        cfg.write_text('allowed_uids = [0]\nrequest_timeout = "never"\n')
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: "event=reload_failed key=request_timeout" in d.logs())
        assert not send_request(d.sock("imap"), request_bytes()).refused
    finally:
        d.stop()


def test_serve_refuses_a_database_not_at_head(pg_cluster):
    url = pg_cluster.create_database()
    d = make_daemon(url)
    out = subprocess.run([sys.executable, "-m", "app", "serve"], env=d.env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 3
    assert out.stderr.strip().splitlines() == [
        out.stderr.strip()] and "run `lastlogin db upgrade`" in out.stderr
    assert not os.path.exists(d.sock("imap"))


def test_socket_owner_group_and_mode_are_applied(db_url):
    import grp
    d = make_daemon(db_url, protocols="imap", socket_mode="0600", socket_group="dovecot",
                    socket_owner="root")
    d.start()
    try:
        st = os.stat(d.sock("imap"))
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == 0 and st.st_gid == grp.getgrnam("dovecot").gr_gid
    finally:
        d.stop()


def test_max_connections_keeps_the_rest_waiting_and_logs_it(sqlite_url):
    d = make_daemon(sqlite_url, protocols="imap", max_connections="2", request_timeout="20")
    d.start()
    idle = []
    try:
        for _ in range(2):                      # two peers that say nothing
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.sock("imap"))
            idle.append(s)
        assert wait_for(lambda: "event=max_connections_reached limit=2" in d.logs())
        result = {}
        t = threading.Thread(target=lambda: result.update(
            ex=send_request(d.sock("imap"), request_bytes())))
        t.start()
        time.sleep(0.5)
        assert t.is_alive()                     # waiting in the backlog, not refused
        idle.pop().close()                      # a slot frees up: served at once
        t.join(10)
        assert not result["ex"].refused
        assert d.logs().count("event=max_connections_reached") == 1
    finally:
        for s in idle:
            s.close()
        d.stop()


def test_default_request_cap_fits_dovecots_largest_userdb_reply(sqlite_url):
    # auth-master lines are at most 8 KiB: every field of such a reply fits
    fields = [b"uid=5000", b"gid=5000", b"home=/var/vmail/a"] + [
        b"acl_groups=" + b"g" * 8000]
    d = make_daemon(sqlite_url, protocols="imap")
    d.start()
    try:
        ok = send_request(d.sock("imap"), request_bytes(fields=fields))
        assert ok.reply == build_reply(b"alice@example.com", fields)
        big = request_bytes(fields=[b"x=" + b"\x01" * (64 << 10)])
        assert send_request(d.sock("imap"), big).refused
    finally:
        d.stop()
    assert "reason=\"request larger than 65536 bytes\"" in d.logs()


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_the_login_line_without_a_log_record_is_the_same_line(fmt):
    """logs.emit (the one line per login) writes what logger.info would, and
    takes the ordinary path when a handler is not one of ours."""
    import io
    import logging

    from app.logs import Shown, emit, setup_logging, show
    root = logging.getLogger("lastlogin")
    saved = root.handlers[:], root.level, root.propagate
    setup_logging("info", fmt, ["hunter2"])
    out = io.StringIO()
    root.handlers[0].stream = out
    log = logging.getLogger("lastlogin.server")
    args = ("imap", show(b"eve hunter2\x1b[2J"), "198.51.100.7", "-", "allowed", "-",
            show(b"PLAIN"), 1, 0.25, Shown(" reason=x"))
    fmt_line = "event=login protocol=%s user=%s rip=%s lip=%s outcome=%s rule=%s mech=%s " \
               "alerts=%d ms=%.2f%s"
    try:
        log.info(fmt_line, *args)
        emit(log, logging.INFO, fmt_line, *args)
        ordinary, fast = out.getvalue().splitlines()
        assert fast == ordinary and "hunter2" not in fast and "\x1b" not in fast
        seen = []
        foreign = logging.Handler()
        foreign.emit = seen.append              # type: ignore[method-assign]
        root.addHandler(foreign)
        emit(log, logging.INFO, fmt_line, *args)
        assert len(seen) == 1 and len(out.getvalue().splitlines()) == 3
    finally:
        root.handlers[:], root.level, root.propagate = saved


# The connection handler in-process (no service is reached): what a daemon
# cannot show deterministically.
def _run(main, loop="asyncio"):
    if loop == "uvloop":
        import uvloop
        return uvloop.run(main())
    import asyncio
    return asyncio.run(main())


def _server(**kw):
    import dataclasses
    import types

    from app.config import Settings
    from app.server import Server
    no_service = types.SimpleNamespace(metrics=None)       # none is reached
    server = Server(dataclasses.replace(Settings(), **kw), no_service, [])  # type: ignore[arg-type]
    server.start()
    return server


def _waiting_conn(server):
    """A connection whose request has not come: its reader is on the loop."""
    from app.server import Connection
    ours, peer = socket.socketpair()
    conn = Connection(server, "imap", ours)
    server._inflight.add(conn)
    conn.read()
    assert conn.waiting
    return conn, peer


def test_a_cut_task_that_never_ran_still_closes_its_connection():
    """drain's cut() on a Task cancelled before its first step (its finally
    never runs): the connection closes all the same, the peer sees EOF."""
    import asyncio

    async def main():
        server = _server()
        conn, peer = _waiting_conn(server)
        conn.run(asyncio.sleep(60))
        conn.cut()
        await asyncio.wait([conn.task])
        await asyncio.sleep(0)
        return conn.closed, len(server._inflight), peer.recv(1, socket.MSG_DONTWAIT)
    assert _run(main) == (True, 0, b"")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_request_sweep_follows_a_lowered_timeout_and_fires_once(loop):
    """SIGHUP lowers request_timeout while the sweep is armed for a later
    deadline: the new connection's earlier one re-arms it; and one sweep
    ends it (uvloop's timers fire up to 1 ms early)."""
    import asyncio
    import dataclasses

    async def main():
        server = _server(request_timeout=60.0)
        slow, _p1 = _waiting_conn(server)
        server.reconfigure(dataclasses.replace(server.settings, request_timeout=0.05))
        sweeps = []
        expire = server._expire
        server._expire = lambda: (sweeps.append(1), expire())     # type: ignore[method-assign]
        quick, p2 = _waiting_conn(server)
        p2.setblocking(False)
        assert server._sweep_at == quick.deadline < slow.deadline
        await asyncio.get_running_loop().sock_recv(p2, 1)         # EOF: timed out
        out = quick.closed, slow.closed, len(sweeps)
        slow.close()
        return out
    assert _run(main, loop) == (True, False, 1)


def test_the_sweep_goes_on_when_one_connection_cannot_be_failed(monkeypatch, caplog):
    from app.server import Connection

    async def main():
        server = _server()
        first, _p1 = _waiting_conn(server)
        second, _p2 = _waiting_conn(server)
        fail = Connection.fail

        def fails_first(conn, exc):
            if conn is first:
                raise RuntimeError("a bug")
            fail(conn, exc)
        monkeypatch.setattr(Connection, "fail", fails_first)
        first.deadline = second.deadline = 0.0
        server._expire()
        out = second.closed, first in server._waiting
        first.close()
        return out
    assert _run(main) == (True, False)
    assert "event=internal_error" in caplog.text


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_write_that_waits_leaves_the_fd_flags_as_they_were(loop):
    """Protocol doc 14.11: the client fd is Dovecot's too; uvloop's add_writer
    sets O_NONBLOCK on it, write_fd puts the flags back."""
    import asyncio
    import fcntl

    from app.fdio import write_fd

    async def main():
        client, mail = socket.socketpair()          # both blocking
        filled = 0
        try:
            while True:
                filled += client.send(b"z" * 65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        before = fcntl.fcntl(client.fileno(), fcntl.F_GETFL)
        writing = asyncio.ensure_future(write_fd(client.fileno(), b"alert", 10))
        await asyncio.sleep(0)                      # waiting for the fd

        def read_all():
            got = 0
            while got < filled + 5:
                got += len(mail.recv(1 << 20))
        await asyncio.to_thread(read_all)
        await writing
        return before, fcntl.fcntl(client.fileno(), fcntl.F_GETFL)
    before, after = _run(main, loop)
    assert after == before and not before & os.O_NONBLOCK


def test_the_login_line_is_formatted_under_the_handler_lock():
    """As Handler.handle does: the formatter's stamp cache is shared with the
    other threads' lines."""
    import logging

    from app.logs import _KVFormatter, emit, setup_logging
    root = logging.getLogger("lastlogin")
    saved = root.handlers[:], root.level, root.propagate
    setup_logging("info", "kv")
    handler = root.handlers[0]
    held = []

    class Checking(_KVFormatter):
        def line(self, *a, **kw):
            held.append(handler.lock._is_owned())     # type: ignore[union-attr]
            return super().line(*a, **kw)
    handler.setFormatter(Checking())
    handler.stream = open(os.devnull, "w")
    try:
        emit(logging.getLogger("lastlogin.server"), logging.INFO, "event=login x=%s", 1)
    finally:
        handler.stream.close()
        root.handlers[:], root.level, root.propagate = saved
    assert held == [True]
