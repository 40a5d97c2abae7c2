"""Operations: metrics, log lines, packaging, the compose file, shell completion."""

from __future__ import annotations

import json
import os
import re
import shutil
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
    for service in ("postgres", "migrate", "lastlogin", "dovecot"):
        assert re.search(rf"^  {service}:$", full, re.M), service
    assert "service_completed_successfully" in full and "service_healthy" in full
