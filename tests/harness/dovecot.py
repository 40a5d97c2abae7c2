"""A throw-away Dovecot 2.3 on 127.0.0.1, wired to lastlogin's sockets.

Everything lives in one short directory under /tmp (UNIX socket paths must
fit in 108 bytes). Dovecot daemonizes; it is stopped by the pid it wrote.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.pg import MissingComponent, free_port

MAIL_UID = MAIL_GID = 65534          # nobody/nogroup owns the test maildirs
TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "dovecot" / "lastlogin-test.conf"


MODES = ("lastlogin", "none", "script")
SCRIPT_SERVICE = """
service {proto}-postlogin {{
  executable = script-login {script}
  user = dovecot
  unix_listener {proto}-postlogin {{
  }}
}}
"""


def render_config(template: Path, values: dict[str, str], mode: str = "lastlogin",
                  script: str = "", mail_debug: bool = True) -> str:
    """A test config (2.3 or 2.4 template) with its @PLACEHOLDERS@ filled in.

    ``mode`` is what the imap and pop3 services run after a login:
    ``lastlogin`` its sockets in SOCKET_DIR (the template as written),
    ``none`` nothing (the mail process starts at once), ``script`` Dovecot's
    script-login running ``script``, the classic shell post-login hook.
    """
    if mode not in MODES:
        raise ValueError(f"unknown post-login mode {mode!r}; one of {', '.join(MODES)}")
    text = template.read_text()
    if not mail_debug:
        text = text.replace("mail_debug = yes", "mail_debug = no")
    extra = values.get("EXTRA", "")
    for proto in ("imap", "pop3"):
        wired = f"executable = {proto} @SOCKET_DIR@/{proto}.sock"
        if mode == "none":
            text = text.replace(wired, f"executable = {proto}")
        elif mode == "script":
            text = text.replace(wired, f"executable = {proto} {proto}-postlogin")
            extra += SCRIPT_SERVICE.format(proto=proto, script=script)
    for key, value in {**values, "EXTRA": extra}.items():
        text = text.replace("@" + key + "@", value)
    return text


def policy_config(port: int, api_key: str, version: str = "2.3",
                  reject_on_fail: bool = False, nonce: str = "lastlogin-test-nonce") -> str:
    """Dovecot's auth policy settings pointing at lastlogin's policy_listen
    (docs/policy-server.md: the same text, for 2.3 and for 2.4)."""
    common = (f"auth_policy_server_url = http://127.0.0.1:{port}/\n"
              f"auth_policy_server_api_header = X-API-Key: {api_key}\n"
              f"auth_policy_hash_nonce = {nonce}\n"
              f"auth_policy_reject_on_fail = {'yes' if reject_on_fail else 'no'}\n")
    if version == "2.3":
        return common + ("auth_policy_request_attributes = login=%{requested_username} "
                         "pwhash=%{hashed_password} remote=%{rip} local=%{lip} "
                         "protocol=%s session_id=%{session}\n")
    return common + ("auth_policy_request_attributes {\n"
                     "  login = %{requested_username}\n"
                     "  pwhash = %{hashed_password}\n"
                     "  remote = %{remote_ip}\n"
                     "  local = %{local_ip}\n"
                     "  protocol = %{protocol}\n"
                     "  session_id = %{session}\n"
                     "  fail_type = %{fail_type}\n"
                     "}\n")


def passwd_escape(name: bytes) -> bytes:
    """A username as a passwd-file lookup sees it.

    Dovecot expands %u with its str_escape() for the lookup, so the file
    must hold backslash, double quote and single quote escaped that way.
    """
    out = name.replace(b"\\", b"\\\\")
    return out.replace(b'"', b'\\"').replace(b"'", b"\\'")


@dataclass
class Dovecot:
    base: str
    socket_dir: str
    imap_port: int = 0
    pop3_port: int = 0
    users: dict[bytes, bytes] = field(default_factory=dict)
    extra: str = ""
    mode: str = "lastlogin"         # see render_config
    script: str = ""
    mail_debug: bool = True

    @property
    def config_path(self) -> str:
        return os.path.join(self.base, "dovecot.conf")

    @property
    def log_path(self) -> str:
        return os.path.join(self.base, "dovecot.log")

    def logs(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def add_user(self, name: bytes, password: bytes = b"secret") -> None:
        self.users[name] = password
        self._write_passwd()

    def _write_passwd(self) -> None:
        lines = []
        for i, (name, pw) in enumerate(self.users.items()):
            home = f"{self.base}/home/u{i}".encode()
            lines.append(passwd_escape(name) + b":{PLAIN}" + pw +
                         f":{MAIL_UID}:{MAIL_GID}::".encode() + home + b"::")
        path = os.path.join(self.base, "passwd")
        with open(path, "wb") as fh:
            fh.write(b"\n".join(lines) + b"\n")
        os.chmod(path, 0o640)
        shutil.chown(path, "root", "dovecot")

    def write_config(self) -> None:
        values = {"BASE": self.base, "SOCKET_DIR": self.socket_dir,
                  "IMAP_PORT": str(self.imap_port), "POP3_PORT": str(self.pop3_port),
                  "MAIL_UID": str(MAIL_UID), "EXTRA": self.extra, "LISTEN": "127.0.0.1"}
        Path(self.config_path).write_text(render_config(
            TEMPLATE, values, self.mode, self.script, self.mail_debug))

    def start(self) -> None:
        dovecot = shutil.which("dovecot") or "/usr/sbin/dovecot"
        if not os.access(dovecot, os.X_OK):
            raise MissingComponent("dovecot not found: install the Debian packages "
                                   "dovecot-imapd and dovecot-pop3d")
        self.write_config()
        # stdout/stderr to a file: a daemonized Dovecot keeps them open
        with open(os.path.join(self.base, "start.out"), "wb") as out:
            rc = subprocess.run([dovecot, "-c", self.config_path], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            raise RuntimeError("dovecot did not start: "
                               + Path(self.base, "start.out").read_text() + self.logs())
        for port in (self.imap_port, self.pop3_port):
            wait_port(port, self.logs)

    def pid(self) -> int | None:
        try:
            return int(Path(self.base, "run", "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> None:
        stop_master(Path(self.base, "run", "master.pid"))


def stop_master(pid_file: Path, timeout: float = 20.0) -> None:
    """End the Dovecot master we started, by the pid it wrote, and wait for it."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def wait_port(port: int, logs, timeout: float = 20.0) -> None:
    """Wait until 127.0.0.1:``port`` accepts; on timeout raise with ``logs()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"dovecot is not listening on {port}:\n{logs()}")


def make_dovecot(socket_dir: str) -> Dovecot:
    base = tempfile.mkdtemp(prefix="lldc-", dir="/tmp")
    os.chmod(base, 0o755)
    home = os.path.join(base, "home")
    os.mkdir(home)
    os.chown(home, MAIL_UID, MAIL_GID)
    return Dovecot(base=base, socket_dir=socket_dir, imap_port=free_port(),
                   pop3_port=free_port())
