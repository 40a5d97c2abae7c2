"""A throw-away PostgreSQL server for the test suite.

Started from the installed server binaries in a temporary directory, on a
free port of 127.0.0.1, and stopped (by its own pid, through pg_ctl) at the
end. PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` system user (or ``nobody``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass

import sqlalchemy as sa


class MissingComponent(RuntimeError):
    pass


def find_pg_bindir() -> str:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for d in candidates:
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            return d
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    raise MissingComponent(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install the Debian "
        "package 'postgresql' or set LASTLOGIN_TEST_DATABASE_URL to a server's URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_as(user: str, server: str) -> str | None:
    """Who runs a database server we start: as root, ``user`` (or nobody);
    None when we are not root (it runs as us)."""
    if os.geteuid() != 0:
        return None
    for name in (user, "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise MissingComponent(f"running as root and no '{user}' or 'nobody' user to run {server}")


def _run_as() -> str | None:
    return run_as("postgres", "PostgreSQL")


@dataclass
class PgServer:
    bindir: str
    base: str
    port: int
    user: str | None

    @property
    def datadir(self) -> str:
        return os.path.join(self.base, "data")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def _cmd(self, *args: str) -> list[str]:
        cmd = [os.path.join(self.bindir, args[0]), *args[1:]]
        return ["runuser", "-u", self.user, "--", *cmd] if self.user else cmd

    def start(self) -> None:
        os.makedirs(self.datadir)
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            os.chown(self.datadir, pw.pw_uid, pw.pw_gid)
        subprocess.run(self._cmd("initdb", "-D", self.datadir, "-U", "postgres",
                                 "-A", "trust", "-E", "UTF8", "--no-sync"),
                       check=True, capture_output=True)
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} "
                "-c fsync=on -c max_connections=200")
        subprocess.run(self._cmd("pg_ctl", "-D", self.datadir, "-w", "-t", "60",
                                 "-l", os.path.join(self.base, "log"), "-o", opts, "start"),
                       check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(self._cmd("pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop"),
                       capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def is_running(self) -> bool:
        return subprocess.run(self._cmd("pg_ctl", "-D", self.datadir, "status"),
                              capture_output=True).returncode == 0


def start_server() -> PgServer:
    bindir = find_pg_bindir()
    base = tempfile.mkdtemp(prefix="llpg-", dir="/tmp")
    os.chmod(base, 0o755)
    server = PgServer(bindir, base, free_port(), _run_as())
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        log = os.path.join(base, "log")
        tail = open(log).read()[-2000:] if os.path.exists(log) else ""
        raise MissingComponent(
            f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')} {tail}") from None
    return server


def psycopg_url(url: str) -> str:
    """postgresql://... as SQLAlchemy's psycopg 3 dialect spells it."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def server_url(env_var: str) -> tuple[str, PgServer | None]:
    """A PostgreSQL URL whose user may CREATE DATABASE: the one in ``env_var``
    or, without it, a throw-away server started here. The server (None when
    the URL came from the environment) is the caller's to stop."""
    url = os.environ.get(env_var)
    if url:
        return psycopg_url(url), None
    server = start_server()
    return server.url(), server


def database_url(server: str, name: str) -> str:
    """The URL of database ``name`` on the server of URL ``server``."""
    return server.rsplit("/", 1)[0] + "/" + name


def create_database(admin_url: str, prefix: str = "lltest") -> str:
    """A new, empty database with a unique name; returns its URL."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    return database_url(admin_url, name)
