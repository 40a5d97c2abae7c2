"""The handler benchmark, as a smoke test: it runs, and every login is stored once.
Its C load client (bench/postlogin_load.c) sends what Dovecot sends and counts
what goes wrong as failures. These need gcc: without it they fail, not skip.

No timing is asserted here; speed is measured by `python -m bench.handler`.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from app.protocol import build_request
from bench.handler import FIELDS, CClient, request_parts

ROOT = Path(__file__).resolve().parents[1]


def test_handler_benchmark_smoke(pg_cluster):
    url = pg_cluster.create_database()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    env.update(LASTLOGIN_BENCH_DATABASE_URL=url, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "bench.handler", "--smoke"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "smoke (python client): 2 x 96 logins answered" in out.stdout
    assert "smoke (c client): 2 x 96 logins answered" in out.stdout
    assert "smoke (commit-floor): 96 logins answered, 96 usernames committed" in out.stdout
    # the CPU budget was measured in the smoke runs (bench.handler.smoke asserts
    # the figures are there, client CPU > 0); a server of the environment's: no PostgreSQL
    for mode in ("null", "lastlogin"):
        assert len(re.findall(rf"[:;] {mode} \d+\.\d+\+\d+\.\d+\+-=\d+\.\d+ ", out.stdout)) == 2


def budget_rows(stdout: str) -> list[dict[str, str]]:
    """The rows of the printed "CPU budget per login" table, by column."""
    lines = stdout.splitlines()
    head = next(i for i, ln in enumerate(lines)
                if ln.startswith("| concurrency | mode | logins/s |"))
    names = [c.strip() for c in lines[head].strip("|").split("|")]
    rows = []
    for ln in lines[head + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in ln.strip("|").split("|")))))
    return rows


def ms(cell: str) -> float:
    assert cell.endswith(" ms"), cell
    return float(cell[:-3])


def test_handler_benchmark_reports_the_cpu_budget_per_login():
    # a tiny run, printed, not written: the budget table has every figure, positive,
    # the total the sum of the three; a throw-away server of the benchmark's own, so that
    # PostgreSQL's CPU is measured, unless the environment names a server (then "-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    env.update(PYTHONPATH=str(ROOT))
    theirs = os.environ.get("LASTLOGIN_TEST_DATABASE_URL")
    if theirs:
        env.update(LASTLOGIN_BENCH_DATABASE_URL=theirs)
    out = subprocess.run([sys.executable, "-m", "bench.handler", "--concurrency", "8",
                          "--rounds", "1", "--seconds", "1", "--loops", "asyncio", "--no-sqlite",
                          "--memory-logins", "0", "--no-doc"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = budget_rows(out.stdout)
    assert [(r["concurrency"], r["mode"]) for r in rows] == [
        ("8", "null"), ("8", "commit-floor"), ("8", "lastlogin")]
    for r in rows:
        assert int(r["logins/s"].replace(",", "")) > 0, r
        assert ms(r["handler"]) > 0 and ms(r["client"]) > 0, r
        assert ms(r["available"]) > 0 and ms(r["whole machine"]) > 0, r
        assert int(r["busy"].rstrip("%")) > 0, r
        pg = 0.0 if theirs else ms(r["PostgreSQL"])
        assert (r["PostgreSQL"] == "-") if theirs else (pg >= 0), r
        assert abs(ms(r["total"]) - (ms(r["handler"]) + ms(r["client"]) + pg)) <= 0.0021, r
    if not theirs:      # the commit floor and lastlogin commit every login on it
        assert ms(rows[1]["PostgreSQL"]) > 0 and ms(rows[2]["PostgreSQL"]) > 0, rows


def test_geoip_benchmark_smoke():
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    env.update(PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "bench.geoip", "--smoke"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "geoip benchmark ran" in out.stdout


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="llcl-", dir="/tmp"))    # short: sun_path is 108 bytes
    yield d
    shutil.rmtree(d)


@pytest.fixture
def cclient(sockdir):
    return CClient(sockdir)


@pytest.fixture
def impatient_cclient(sockdir):
    """For a listener that never accepts: each login gives up after 0.3 s."""
    return CClient(sockdir, login_timeout=0.3)


class Served:
    """A listener on a thread; ``stop()`` ends it once the connection in hand
    has been handled, so what the handler saw is all there afterwards (the
    client has its reply before the handler is done with the connection)."""

    def __init__(self, sock: socket.socket, thread: threading.Thread):
        self.sock, self.thread = sock, thread

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes the accept (EINVAL)
        except OSError:
            pass
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "the test listener's handler did not finish"


def serve(path: Path, handle, listen: int = 64) -> Served:
    """A listener on ``path`` whose connections go, one at a time, to ``handle``
    on a thread."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(listen)

    def loop():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                try:
                    handle(conn)
                except OSError:
                    pass            # the client gave up on this one: serve the next

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return Served(sock, thread)


def read_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    data, fds = b"", []
    while data.count(b"\n") < 2:
        chunk, more, _flags, _addr = socket.recv_fds(conn, 65536, 4)
        if not chunk:
            break
        data += chunk
        fds += more
    return data, fds


def test_c_client_sends_what_dovecot_sends(cclient, sockdir):
    seen: list[tuple[bytes, int, bytes]] = []

    def handle(conn):
        data, fds = read_request(conn)
        conn.sendall(b"user\tuid=5000\n")
        conn.close()
        passed = [socket.socket(fileno=fd) for fd in fds]
        # the client closed its end of the pair after the reply: EOF on the passed end
        eof = passed[0].recv(1) if passed else b"?"
        for p in passed:
            p.close()
        seen.append((data, len(fds), eof))

    listener = serve(sockdir / "rec.sock", handle)
    try:
        run = cclient.drive(str(sockdir / "rec.sock"), "rec", 2, None, 6, "rq7-")
    finally:
        listener.stop()
    assert (run.logins, run.failures, len(run.latencies)) == (6, 0, 6)
    expected = {build_request(b"192.0.2.25", b"198.51.100.7", f"rq7-{n}-{i}@example.com".encode(),
                              FIELDS) for n in range(2) for i in range(3)}
    assert sorted(d for d, _, _ in seen) == sorted(expected)
    assert all(nfds == 1 and eof == b"" for _, nfds, eof in seen)


def test_c_client_refuses_prefixes_that_need_escaping():
    with pytest.raises(ValueError):
        request_parts("a\tb-")


@pytest.mark.parametrize("reply", [b"", b"user\tno line end"])
def test_c_client_counts_a_reply_without_lf_as_a_failure(cclient, sockdir, reply):
    def handle(conn):
        read_request(conn)
        conn.sendall(reply)

    listener = serve(sockdir / "bad.sock", handle)
    try:
        run = cclient.drive(str(sockdir / "bad.sock"), "bad", 2, None, 8, "f-")
    finally:
        listener.stop()
    assert (run.logins, run.failures) == (0, 8)


def test_c_client_goes_on_through_refusals_full_backlogs_and_timeouts(cclient, impatient_cclient,
                                                                      sockdir):
    # no socket at all (ENOENT), then one nobody listens on (ECONNREFUSED)
    run = cclient.drive(str(sockdir / "missing.sock"), "x", 4, None, 40, "m-")
    assert (run.logins, run.failures) == (0, 40)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(sockdir / "dead.sock"))
    dead.close()
    run = cclient.drive(str(sockdir / "dead.sock"), "x", 4, None, 40, "d-")
    assert (run.logins, run.failures) == (0, 40)
    # a listener that never accepts: a connect or two queue and time out (0.3 s
    # each here, 20 s in the bench), the rest find the backlog full (EAGAIN)
    stuck = socket.socket(socket.AF_UNIX)
    stuck.bind(str(sockdir / "stuck.sock"))
    stuck.listen(1)
    try:
        run = impatient_cclient.drive(str(sockdir / "stuck.sock"), "x", 8, None, 40, "s-")
    finally:
        stuck.close()
    assert (run.logins, run.failures) == (0, 40)
