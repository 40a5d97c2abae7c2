"""Dovecot 2.4 (Debian 13) in a chroot, for the 2.4 end-to-end tests.

scripts/test builds the root once with debootstrap (a minimal trixie with
dovecot-imapd and dovecot-pop3d) in /var/cache/lastlogin/trixie-dovecot.
Each test instance lives in <root>/srv/<name>: Dovecot sees /srv/<name>,
the daemon outside sees the same files under the root, so the post-login
sockets need no bind mount. Ports are on 127.0.0.1 (the chroot shares the
network).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.dovecot import render_config, stop_master, wait_port
from tests.harness.pg import MissingComponent, free_port

ROOT = Path(os.environ.get("LASTLOGIN_TEST_DOVECOT24_ROOT",
                           "/var/cache/lastlogin/trixie-dovecot"))
TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "dovecot" / "lastlogin-test-2.4.conf"
MAIL_UID = 65534


def _chroot_gid(group: str) -> int:
    for line in (ROOT / "etc" / "group").read_text().splitlines():
        name, _, gid, *_ = line.split(":")
        if name == group:
            return int(gid)
    raise MissingComponent(f"no group {group} in {ROOT}")


@dataclass
class Dovecot24:
    name: str
    imap_port: int = field(default_factory=free_port)
    pop3_port: int = field(default_factory=free_port)
    users: list[bytes] = field(default_factory=list)
    extra: str = ""                 # appended to the config (@EXTRA@)

    @property
    def inside(self) -> str:
        return f"/srv/{self.name}"

    @property
    def outside(self) -> Path:
        return ROOT / "srv" / self.name

    @property
    def socket_dir(self) -> str:
        return str(self.outside / "ll")

    def logs(self) -> str:
        try:
            return (self.outside / "dovecot.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def add_user(self, name: bytes) -> None:
        self.users.append(name)
        lines = [n + f":{{PLAIN}}secret:{MAIL_UID}:{MAIL_UID}::{self.inside}/home/u{i}::".encode()
                 for i, n in enumerate(self.users)]
        path = self.outside / "passwd"
        path.write_bytes(b"\n".join(lines) + b"\n")
        os.chown(path, 0, _chroot_gid("dovecot"))
        os.chmod(path, 0o640)

    def start(self) -> None:
        (self.outside / "dovecot.conf").write_text(render_config(TEMPLATE, {
            "BASE": self.inside, "SOCKET_DIR": f"{self.inside}/ll", "LISTEN": "127.0.0.1",
            "IMAP_PORT": str(self.imap_port), "POP3_PORT": str(self.pop3_port),
            "MAIL_UID": str(MAIL_UID), "EXTRA": self.extra}))
        with open(self.outside / "start.out", "wb") as out:
            rc = subprocess.run(["chroot", str(ROOT), "dovecot", "-c",
                                 f"{self.inside}/dovecot.conf"], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            raise RuntimeError("dovecot 2.4 did not start: "
                               + (self.outside / "start.out").read_text() + self.logs())
        for port in (self.imap_port, self.pop3_port):
            wait_port(port, self.logs)

    def stop(self) -> None:
        stop_master(self.outside / "run" / "master.pid")


def make_dovecot24() -> Dovecot24:
    if not (ROOT / "usr" / "sbin" / "dovecot").exists():
        raise MissingComponent(
            f"no Dovecot 2.4 root at {ROOT}: scripts/test builds it with debootstrap "
            "(as root), or set LASTLOGIN_TEST_DOVECOT24_ROOT")
    (ROOT / "srv").mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="t", dir=ROOT / "srv"))
    os.chmod(base, 0o755)
    for sub in ("run", "state", "ll"):
        (base / sub).mkdir()
    (base / "home").mkdir()
    os.chown(base / "home", MAIL_UID, MAIL_UID)
    return Dovecot24(name=base.name)
