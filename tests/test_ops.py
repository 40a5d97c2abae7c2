"""Operations: metrics, log lines, packaging, the compose file, shell completion."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path


from app import __version__
from tests.builders import request_bytes
from tests.harness.daemon import make_daemon
from tests.harness.pg import free_port
from tests.harness.postlogin import send_request
from app.db import make_engine
from app.db.rules import add_rule

ROOT = Path(__file__).resolve().parents[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def value(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name}{labels} not in metrics"
    return float(m.group(1))


def test_metrics_endpoint(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        add_rule(conn, action="deny", username="eve@example.com")
    engine.dispose()
    port = free_port()
    d = make_daemon(db_url, protocols="imap,pop3", metrics_listen=f"127.0.0.1:{port}")
    d.start()
    try:
        for _ in range(3):
            send_request(d.sock("imap"), request_bytes())
        send_request(d.sock("pop3"), request_bytes(b"eve@example.com"))
        send_request(d.sock("imap"), b"garbage\n\n")
        text = scrape(port)
    finally:
        d.stop()
    assert value(text, "lastlogin_logins_total", '{outcome="allowed",protocol="imap"}') == 3
    assert value(text, "lastlogin_logins_total", '{outcome="denied",protocol="pop3"}') == 1
    assert value(text, "lastlogin_refused_connections_total") == 1
    assert value(text, "lastlogin_record_seconds_count") == 4
    assert value(text, "lastlogin_decision_seconds_count") == 4
    assert value(text, "lastlogin_spool_bytes") == 0
    assert value(text, "lastlogin_database_down") == 0
    assert 0 <= value(text, "lastlogin_rules_age_seconds") < 30
    assert value(text, "lastlogin_database_errors_total") == 0


def test_json_log_lines_have_the_login_and_no_secret(db_url):
    d = make_daemon(db_url, protocols="imap", log_format="json", log_level="info")
    d.start()
    try:
        send_request(d.sock("imap"), request_bytes(b"o'hara \"q\"@example.com"))
    finally:
        d.stop()
    lines = [json.loads(ln) for ln in d.logs().splitlines() if ln.startswith("{")]
    (login,) = [ln for ln in lines if ln.get("event") == "login"]
    assert login["user"] == 'o\'hara \\"q\\"@example.com'
    assert (login["protocol"], login["rip"], login["lip"], login["outcome"]) == (
        "imap", "198.51.100.7", "192.0.2.25", "allowed")
    assert float(login["ms"]) > 0
    assert "3f2a0c9e5b7d41e08a6c2f1b9d3e7a5c4b8f0e12" not in d.logs()


def test_version_and_shell_completion():
    out = subprocess.run([sys.executable, "-m", "app", "--version"], capture_output=True,
                         text=True)
    assert out.stdout.strip() == f"lastlogin, version {__version__}"
    lastlogin = shutil.which("lastlogin", path=os.path.dirname(sys.executable))
    assert lastlogin, "the lastlogin command is installed with the package"
    comp = subprocess.run([lastlogin], env={**os.environ, "_LASTLOGIN_COMPLETE": "bash_source"},
                          capture_output=True, text=True)
    assert "_lastlogin_completion" in comp.stdout


def test_compose_file_is_valid_and_shares_the_test_dovecot_config():
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose (Debian package) is needed to validate the stack"
    out = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    full = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, cwd=ROOT).stdout
    # the Dovecot config the stack mounts is the one the end-to-end tests use
    assert "deploy/dovecot/lastlogin-test.conf" in full
    for service in ("postgres", "migrate", "lastlogin", "dovecot", "web"):
        assert re.search(rf"^  {service}:$", full, re.M), service
    assert "service_completed_successfully" in full and "service_healthy" in full


UNITS = ROOT / "deploy" / "systemd"


def unit_value(text: str, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", text, re.M)


def test_production_install_matches_the_unit(tmp_path):
    """scripts/install (the documented command) into a temporary root: the
    path the unit's ExecStart names runs lastlogin; the units verify; the
    sysusers.d file makes the unit's user."""
    root = tmp_path / "root"
    out = subprocess.run([str(ROOT / "scripts" / "install")], env={**os.environ, "DESTDIR": str(root)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    service = (root / "etc/systemd/system/lastlogin.service").read_text()
    (exec_start,) = unit_value(service, "ExecStart")
    binary, command = exec_start.split(" ", 1)
    assert binary.startswith("/opt/lastlogin/") and command == "serve"
    version = subprocess.run([str(root) + binary, "--version"], capture_output=True, text=True,
                             cwd="/")
    assert version.stdout.strip() == f"lastlogin, version {__version__}"
    # systemd-analyze verify checks ExecStart exists: point it into the root
    check = tmp_path / "verify"
    check.mkdir()
    (check / "lastlogin.service").write_text(service.replace(binary, str(root) + binary))
    shutil.copy(root / "etc/systemd/system/lastlogin.socket", check / "lastlogin.socket")
    web = (root / "etc/systemd/system/lastlogin-web.service").read_text()
    assert unit_value(web, "ExecStart") == [f"{binary} web"]
    (check / "lastlogin-web.service").write_text(web.replace(binary, str(root) + binary))
    verify = subprocess.run(["systemd-analyze", "verify", str(check / "lastlogin.service"),
                             str(check / "lastlogin.socket"),
                             str(check / "lastlogin-web.service")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    # the user the unit runs as, from the shipped sysusers.d file
    (tmp_path / "sys" / "etc").mkdir(parents=True)
    users = subprocess.run(["systemd-sysusers", f"--root={tmp_path / 'sys'}",
                            str(root / "usr/lib/sysusers.d/lastlogin.conf")],
                           capture_output=True, text=True)
    assert users.returncode == 0, users.stderr
    # the daemon and the CLI read one settings file: the same database and sockets
    from app.config import load_settings
    toml = root / "etc/lastlogin/lastlogin.toml"
    assert stat.S_IMODE(toml.stat().st_mode) == 0o640
    settings = load_settings(str(toml), environ={})
    assert (settings.socket_dir, settings.data_dir) == ("/run/lastlogin", "/var/lib/lastlogin")
    assert not any(e.startswith(("LASTLOGIN_SOCKET_DIR", "LASTLOGIN_DATA_DIR"))
                   for e in unit_value(service, "Environment"))
    assert unit_value(service, "RuntimeDirectory") == ["lastlogin"]
    assert unit_value(service, "StateDirectory") == ["lastlogin"]
    env_file = root / "etc/lastlogin/lastlogin.env"        # where the password goes
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600 and env_file.read_bytes() == b""
    (user,) = unit_value(service, "User")
    passwd = (tmp_path / "sys/etc/passwd").read_text()
    assert re.search(rf"^{user}:x:\d+:\d+:.*:/usr/sbin/nologin$", passwd, re.M), passwd


def test_systemd_units_keep_their_promises(tmp_path):
    service = (UNITS / "lastlogin.service").read_text()
    socket_unit = (UNITS / "lastlogin.socket").read_text()
    # no dependency that restarts or stops Dovecot, no pre-start gate
    assert "dovecot.service" in unit_value(service, "Before")
    for key in ("RequiredBy", "Requires", "BindsTo", "PartOf", "ExecStartPre", "Requisite"):
        assert unit_value(service, key) == [], key
    assert unit_value(service, "User") == ["lastlogin"]
    assert unit_value(service, "UMask") == ["0077"]
    assert int(unit_value(service, "LimitNOFILE")[0]) >= 4096
    assert unit_value(service, "NotifyAccess") == ["main"]      # MAINPID= on SIGUSR2
    assert unit_value(service, "EnvironmentFile") == ["-/etc/lastlogin/lastlogin.env"]
    assert not any("DATABASE_URL" in e for e in unit_value(service, "Environment"))
    # sockets only for root: Dovecot's mail processes before they drop privileges
    assert (unit_value(socket_unit, "SocketMode"), unit_value(socket_unit, "SocketUser"),
            unit_value(socket_unit, "SocketGroup")) == (["0600"], ["root"], ["root"])
    # the rating the issue asks for: 2.5 or lower
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                          str(UNITS / "lastlogin.service")],
                         capture_output=True, text=True, cwd=tmp_path)
    m = re.search(r"Overall exposure level for lastlogin.service: ([0-9.]+)", out.stdout)
    assert m, out.stdout[-2000:] + out.stderr
    assert float(m.group(1)) <= 2.5, out.stdout
    # what the daemon reads at start matches the socket unit's paths
    paths = unit_value(socket_unit, "ListenStream")
    assert paths == [f"/run/lastlogin/{p}.sock" for p in
                     ("imap", "pop3", "submission", "managesieve")]
    assert "lastlogin.toml" in service     # where socket_dir and data_dir come from


def test_the_web_unit_is_hardened_like_the_daemons(tmp_path):
    """The dashboard's unit: the daemon's user and settings, its own token
    file, no capabilities, and a rating at least as good as the daemon's."""
    web = (UNITS / "lastlogin-web.service").read_text()
    daemon = (UNITS / "lastlogin.service").read_text()
    assert unit_value(web, "ExecStart") == ["/opt/lastlogin/bin/lastlogin web"]
    assert unit_value(web, "User") == unit_value(daemon, "User") == ["lastlogin"]
    assert unit_value(web, "UMask") == ["0077"]
    assert unit_value(web, "RestartPreventExitStatus") == ["2"]
    assert unit_value(web, "EnvironmentFile") == ["-/etc/lastlogin/lastlogin.env",
                                                  "-/etc/lastlogin/web.env"]
    assert not any("TOKEN" in e for e in unit_value(web, "Environment"))
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert unit_value(web, key) == [""], key
    # every hardening setting of the daemon's unit, but RemoveIPC (a shared user)
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
                "ProtectHostname", "ProtectProc", "ProcSubset", "RestrictAddressFamilies",
                "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
                "LockPersonality", "MemoryDenyWriteExecute", "SystemCallArchitectures"):
        assert unit_value(web, key) == unit_value(daemon, key), key
    assert "RuntimeDirectory" not in web and "StateDirectory" not in web   # the daemon's
    # it reads the state directory and cannot write it (SQLite is opened mode=ro)
    assert unit_value(web, "ReadOnlyPaths") == ["-/var/lib/lastlogin"]
    assert "ReadWritePaths" not in web
    rating = {}
    for name in ("lastlogin.service", "lastlogin-web.service"):
        out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                              str(UNITS / name)], capture_output=True, text=True, cwd=tmp_path)
        m = re.search(rf"Overall exposure level for {re.escape(name)}: ([0-9.]+)", out.stdout)
        assert m, out.stdout[-2000:] + out.stderr
        rating[name] = float(m.group(1))
    assert rating["lastlogin-web.service"] <= min(2.5, rating["lastlogin.service"]), rating
