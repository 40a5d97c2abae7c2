"""Run `lastlogin serve` as a real process for a test."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Daemon:
    env: dict[str, str]
    socket_dir: str
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    config_path: str | None = None
    # bench/: run another checkout's code (cwd and PYTHONPATH), or under a
    # wrapper such as valgrind
    code_dir: str | None = None
    wrapper: list[str] = field(default_factory=list)
    _notify: socket.socket | None = field(default=None, repr=False)

    def sock(self, protocol: str) -> str:
        return os.path.join(self.socket_dir, f"{protocol}.sock")

    def start(self, timeout: float = 20.0) -> None:
        notify_path = os.path.join(self.socket_dir, "notify")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(notify_path)
        self._notify.settimeout(timeout)
        env = {**self.env, "NOTIFY_SOCKET": notify_path}
        if self.code_dir:
            env["PYTHONPATH"] = self.code_dir
        args = [*self.wrapper, sys.executable, "-m", "app"]
        if self.config_path:
            args += ["--config", self.config_path]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args + ["serve"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.code_dir)
        try:
            msg = self._notify.recv(4096)
        except socket.timeout:
            self.stop()
            raise RuntimeError(f"daemon did not become ready:\n{self.logs()}") from None
        assert msg.startswith(b"READY=1"), msg

    def logs(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def loaded_version(self) -> int:
        found = re.findall(r"event=config_loaded version=(\d+)", self.logs())
        return max(map(int, found)) if found else 0

    def wait_config(self, engine, timeout: float = 10.0) -> None:
        """Wait until the daemon holds the rules, overrides and alerts that are
        in the database now (its loaded config_version has caught up)."""
        from app.db.rules import config_version_of
        with engine.connect() as conn:
            wanted = config_version_of(conn)
        if not wait_for(lambda: self.loaded_version() >= wanted, timeout=timeout):
            raise AssertionError(f"the daemon did not load version {wanted}:\n{self.logs()}")

    def forget(self) -> None:
        """After the process died on its own (kill -9): release what start() made."""
        self.proc = None
        self.log.close()
        self._close_notify()

    def _close_notify(self) -> None:
        if self._notify:
            name = self._notify.getsockname()
            self._notify.close()
            os.unlink(name)
            self._notify = None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        self.log.close()
        self._close_notify()
        return rc


def make_daemon(db_url: str, socket_dir: str | None = None, **settings: str) -> Daemon:
    """A daemon on ``db_url`` with LASTLOGIN_<KEY> = value for every setting.
    Its sockets, notify socket and log go to ``socket_dir`` (made if missing;
    a fresh directory under /tmp by default)."""
    if socket_dir:
        os.makedirs(socket_dir, exist_ok=True)
        sockdir = socket_dir
    else:
        sockdir = tempfile.mkdtemp(prefix="lld-", dir="/tmp")
    os.chmod(sockdir, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    env.update({"LASTLOGIN_DATABASE_URL": db_url, "LASTLOGIN_SOCKET_DIR": sockdir,
                "LASTLOGIN_LOG_LEVEL": "debug"})
    env.update({"LASTLOGIN_" + k.upper(): v for k, v in settings.items()})
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return Daemon(env=env, socket_dir=sockdir, log_path=os.path.join(sockdir, "daemon.log"))


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
