"""Restarting the daemon refuses no login: graceful handover, socket activation."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from app.db import make_engine
from app.db.schema import login_events
from app.status import read_status
from tests.harness.db import empty_tables
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.dovecot import make_dovecot
from tests.harness.postlogin import send_request
from tests.builders import request_bytes
from tests.harness.mailclients import imap_login

pytestmark = pytest.mark.e2e


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_graceful_restart_during_real_logins_refuses_none(pg_url):
    engine = make_engine(pg_url)
    empty_tables(engine)
    daemon = make_daemon(pg_url, protocols="imap,pop3")
    dovecot = make_dovecot(daemon.socket_dir)
    users = [f"r{i}@example.com".encode() for i in range(4)]
    for u in users:
        dovecot.add_user(u)
    successor = None
    try:
        dovecot.start()
        daemon.start()
        ok, failed = [], []
        stop = threading.Event()

        def stream():
            i = 0
            while not stop.is_set():
                user = users[i % len(users)]
                try:
                    imap_login(dovecot.imap_port, user).logout()
                    ok.append(user)
                except Exception as exc:  # noqa: BLE001 - counted, then asserted on
                    failed.append(repr(exc))
                i += 1

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        time.sleep(1.0)
        old_pid = daemon.proc.pid
        daemon.signal(signal.SIGUSR2)
        assert daemon.proc.wait(30) == 0                 # the old one stepped down
        m = re.search(r"event=handover_done child_pid=(\d+)", daemon.logs())
        assert m, daemon.logs()
        successor = int(m.group(1))
        assert successor != old_pid and alive(successor)
        time.sleep(1.5)                                  # the successor serves alone
        stop.set()
        t.join(30)
        assert failed == [] and len(ok) > 20
        assert "event=socket_inherited protocol=imap" in daemon.logs()
        with engine.connect() as conn:
            n = conn.execute(sa.select(sa.func.count()).select_from(login_events)).scalar()
        assert n == len(ok)                              # every one recorded, once
    finally:
        dovecot.stop()
        if successor and alive(successor):
            os.kill(successor, signal.SIGTERM)           # started by our daemon, by its pid
            assert wait_for(lambda: not alive(successor), timeout=30)
        daemon.stop()
        empty_tables(engine)
        engine.dispose()
    # the successor removed the sockets when it stopped
    assert not os.path.exists(daemon.sock("imap"))


def test_systemd_socket_activation(db_url, tmp_path):
    d = make_daemon(db_url, protocols="imap")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(d.sock("imap"))
    listener.listen(64)
    # as systemd does it: the socket on fd 3, LISTEN_PID = the daemon's pid
    wrapper = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
               "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
               "os.execv(sys.executable, [sys.executable, '-m', 'app', 'serve'])")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(d.socket_dir, "notify"))
    notify.settimeout(20)
    log = open(d.log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-c", wrapper, str(listener.fileno())],
                            env={**d.env, "NOTIFY_SOCKET": notify.getsockname()},
                            pass_fds=[listener.fileno()], stdout=log, stderr=log)
    try:
        assert notify.recv(100).startswith(b"READY=1")
        # a login queued on systemd's socket before we even looked is served
        assert not send_request(d.sock("imap"), request_bytes()).refused
        assert "event=socket_inherited protocol=imap" in d.logs()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()
        notify.close()
    # systemd owns the path: it is still there, and still accepts connections
    assert os.path.exists(d.sock("imap"))
    probe = socket.socket(socket.AF_UNIX)
    probe.connect(d.sock("imap"))
    probe.close()
    listener.close()


def test_sigusr2_runs_only_lastlogin_and_hands_systemd_the_successor(sqlite_url, tmp_path):
    """A planted ./app in the daemon's working directory is not run by the
    graceful restart; systemd's notify socket gets MAINPID= of the
    successor, which then talks to systemd itself."""
    import shutil
    d = make_daemon(sqlite_url, protocols="imap")
    cwd = tmp_path / "cwd"
    (cwd / "app").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    planted = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("__init__.py", "__main__.py", "cli.py"):
        (cwd / "app" / name).write_text(planted)
    exe = shutil.which("lastlogin", path=os.path.dirname(sys.executable))
    assert exe, "the lastlogin console script is installed with the package"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(d.socket_dir, "notify"))
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)   # as systemd: who sent it
    notify.settimeout(30)

    def message():
        data, anc, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
        (pid, _uid, _gid), = [struct.unpack("3i", d) for lvl, kind, d in anc
                              if kind == socket.SCM_CREDENTIALS]
        return pid, data

    log = open(d.log_path, "ab")
    proc = subprocess.Popen([exe, "serve"], cwd=cwd, stdout=log, stderr=log,
                            env={**d.env, "NOTIFY_SOCKET": notify.getsockname()})
    successor = None
    try:
        assert message() == (proc.pid, b"READY=1\nSTATUS=serving")
        proc.send_signal(signal.SIGUSR2)
        sender, msg = message()
        assert sender == proc.pid and msg.startswith(b"MAINPID="), msg
        successor = int(msg.split(b"=")[1])
        assert proc.wait(30) == 0
        assert f"event=handover_done child_pid={successor}" in d.logs()
        assert not send_request(d.sock("imap"), request_bytes()).refused   # the successor
        with open(f"/proc/{successor}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
        assert argv[1] == b"-I"                         # isolated interpreter
        assert os.readlink(f"/proc/{successor}/cwd") == "/"
        os.kill(successor, signal.SIGTERM)               # started by our daemon, by its pid
        # the only message after MAINPID=: the successor's, on systemd's socket
        assert message() == (successor, b"STOPPING=1")
        assert wait_for(lambda: not alive(successor), timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if successor and alive(successor):
            os.kill(successor, signal.SIGKILL)
        log.close()
        notify.close()
    assert not marker.exists(), "the planted ./app ran"


def test_a_socket_systemd_owns_stays_systemds_after_a_handover(tmp_path, monkeypatch):
    """Socket activation, then SIGUSR2: the successor must not unlink the path
    when it stops (systemd keeps listening on it); a socket we bound is ours."""
    from app.sockets import HANDOVER_ENV, Listener, handover_value, inherited_sockets
    made = []
    for name, owned in (("imap", False), ("pop3", True)):
        path = str(tmp_path / f"{name}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen()
        made.append((Listener(name, path, sock, os.stat(path).st_ino, owned), sock))
    monkeypatch.setenv(HANDOVER_ENV, handover_value([lst for lst, _ in made]))
    got = {path: (sock, owned) for sock, path, owned in inherited_sockets()}
    assert {p: o for p, (_, o) in got.items()} == {
        str(tmp_path / "imap.sock"): False, str(tmp_path / "pop3.sock"): True}
    for path, (sock, owned) in got.items():      # the successor stops
        sock.detach()                             # (same fds as ours: close once, below)
        Listener("x", path, socket.socket(socket.AF_UNIX), os.stat(path).st_ino, owned).close()
    assert os.path.exists(tmp_path / "imap.sock")          # still systemd's
    assert not os.path.exists(tmp_path / "pop3.sock")      # ours: cleaned up
    for _, sock in made:
        sock.close()
    # a predecessor of the release before said path=fd alone: not ours to unlink
    spare = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    monkeypatch.setenv(HANDOVER_ENV, f"{tmp_path / 'old.sock'}={spare.fileno()}")
    ((sock, _, owned),) = inherited_sockets()
    sock.detach()
    spare.close()
    assert owned is False


def test_a_second_sigterm_while_draining_is_logged_and_the_stop_completes(sqlite_url):
    """An impatient second SIGTERM (or a SIGHUP) during the drain does not
    kill the daemon midway: it is logged, the drain ends at drain_timeout and
    the daemon stops the normal way."""
    with _draining(sqlite_url, drain_timeout="2", request_timeout="30") as d:
        d.signal(signal.SIGTERM)
        d.signal(signal.SIGHUP)
        assert d.proc.wait(30) == 0
    logs = d.logs()
    assert "event=signal_ignored signal=SIGTERM reason=stopping" in logs
    assert "event=signal_ignored signal=SIGHUP reason=stopping" in logs
    assert "event=drain_timeout abandoned=1" in logs and "event=stopped" in logs
    d.stop()


def test_a_third_stop_signal_ends_a_stop_that_hangs_at_once(sqlite_url):
    """The stop waits for a stalled login up to drain_timeout (here 50 s): a
    third SIGTERM ends the process at once, with its one line."""
    with _draining(sqlite_url, drain_timeout="50", request_timeout="55") as d:
        d.signal(signal.SIGTERM)
        assert wait_for(lambda: "send it once more to stop at once" in d.logs())
        d.signal(signal.SIGTERM)
        assert d.proc.wait(10) == 1
    assert "event=stop_forced signal=SIGTERM" in d.logs()
    d.stop()


@contextlib.contextmanager
def _draining(db_url, **settings):
    """A daemon told to stop (one SIGTERM) while a login it accepted is still
    waiting for the rest of its request: the drain waits for it."""
    d = make_daemon(db_url, **settings)
    d.start()
    slow = socket.socket(socket.AF_UNIX)
    try:
        slow.connect(d.sock("imap"))
        slow.sendall(b"VERSION\t1")             # a request begun, never finished
        assert wait_for(lambda: getattr(read_status(d.socket_dir), "inflight", 0) == 1)
        d.signal(signal.SIGTERM)
        assert wait_for(lambda: "event=draining inflight=1" in d.logs())
        yield d
    finally:
        slow.close()
