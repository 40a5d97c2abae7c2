"""A throw-away MariaDB server for the import tests (like pg.py for PostgreSQL).

Started from the installed server binaries (Debian's `mariadb-server`;
scripts/test installs it when missing) in a temporary directory, listening
only on 127.0.0.1 on a free port, and stopped by its own pid at the end.
As root the server runs as the ``mysql`` system user (or ``nobody``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from tests.harness.pg import MissingComponent, free_port, run_as


def _binary(*names: str) -> str:
    for name in names:
        for d in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
            path = os.path.join(d, name)
            if os.access(path, os.X_OK):
                return path
        found = shutil.which(name)
        if found:
            return found
    raise MissingComponent(
        f"MariaDB server binaries ({' or '.join(names)}) not found: install the Debian "
        "package 'mariadb-server' (scripts/test does)")


def _run_as() -> str | None:
    return run_as("mysql", "MariaDB")


@dataclass
class MariaDbServer:
    base: str
    port: int
    user: str | None
    process: subprocess.Popen | None = None

    @property
    def datadir(self) -> str:
        return os.path.join(self.base, "data")

    @property
    def socket(self) -> str:
        return os.path.join(self.base, "mysqld.sock")

    def url(self, dbname: str = "") -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        os.makedirs(self.datadir)
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            os.chown(self.datadir, pw.pw_uid, pw.pw_gid)
        install = [_binary("mariadb-install-db", "mysql_install_db"),
                   "--no-defaults", f"--datadir={self.datadir}",
                   "--auth-root-authentication-method=normal", "--skip-test-db"]
        if self.user:
            install.append(f"--user={self.user}")
        subprocess.run(install, check=True, capture_output=True, timeout=120)
        cmd = [_binary("mariadbd", "mysqld"), "--no-defaults", f"--datadir={self.datadir}",
               "--bind-address=127.0.0.1", f"--port={self.port}", f"--socket={self.socket}",
               f"--pid-file={os.path.join(self.base, 'mysqld.pid')}",
               f"--log-error={os.path.join(self.base, 'error.log')}",
               "--innodb-buffer-pool-size=16M",
               "--skip-name-resolve"]
        if self.user:
            cmd.append(f"--user={self.user}")
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        import pymysql
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                break
            try:
                pymysql.connect(host="127.0.0.1", port=self.port, user="root",
                                connect_timeout=2).close()
                return
            except pymysql.err.OperationalError as exc:
                last = exc
                time.sleep(0.2)
        log = os.path.join(self.base, "error.log")
        tail = open(log, errors="replace").read()[-2000:] if os.path.exists(log) else ""
        self.stop()
        raise MissingComponent(f"could not start MariaDB: {last} {tail}")

    def create_database(self, name: str) -> str:
        import pymysql
        conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root")
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}`")
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)


def start_server() -> MariaDbServer:
    base = tempfile.mkdtemp(prefix="llmaria-", dir="/tmp")
    os.chmod(base, 0o755)
    server = MariaDbServer(base, free_port(), _run_as())
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(base, ignore_errors=True)
        raise MissingComponent(
            f"could not initialise MariaDB: {exc.stderr.decode(errors='replace')[-2000:]}"
        ) from None
    return server
