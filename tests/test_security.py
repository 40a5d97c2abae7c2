"""Secure by default (issue 14): directories, files, output, logs, secrets.

Each test names the claim of docs/security.md it holds.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pwd
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from app.cli.output import render
from app.config import ConfigError, load_settings, redact_url
from app.db import make_engine
from app.db.migrate import upgrade
from app.db.store import record_logins
from app.logs import _JSONFormatter, _KVFormatter, set_secrets, show
from app.safedirs import UnsafeDirectory, ensure_private_dir, write_file_atomic
from tests.builders import record, request_bytes
from tests.harness.daemon import make_daemon, wait_for
from tests.harness.pg import free_port
from tests.harness.postlogin import send_request
from tests.harness.cli import lastlogin

OTHER_UID = pwd.getpwnam("nobody").pw_uid
HOSTILE = b"evil\x1b]52;c;cm0gLXJmIH4=\x07\x1b]0;pwned\x07\r\nforged row\xc2\x9b2J\xe2\x80\xaeoops"
FORBIDDEN = (b"\x1b", b"\r", b"\x07", b"\xc2\x9b", b"\xe2\x80\xae")


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- directories -----------------------------------------------------------

def test_directories_are_created_private(tmp_path):
    made = ensure_private_dir(str(tmp_path / "a" / "b"), "data_dir")
    assert made == str(tmp_path / "a" / "b")
    assert mode(made) == 0o700 and mode(tmp_path / "a") == 0o700
    grouped = ensure_private_dir(str(tmp_path / "g"), "socket_dir", group=str(os.getgid()))
    assert mode(grouped) == 0o750 and os.lstat(grouped).st_gid == os.getgid()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root")
def test_foreign_directory_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, -1)
    with pytest.raises(UnsafeDirectory) as err:
        ensure_private_dir(str(d), "socket_dir")
    assert err.value.key == "socket_dir"
    assert f"owned by uid {OTHER_UID}" in err.value.reason


@pytest.mark.parametrize("bits,fragment", [(0o777, "writable by other users"),
                                           (0o770, "writable by group"),
                                           (0o1777, "writable by other users")])
def test_writable_directory_is_refused(tmp_path, bits, fragment):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, bits)
    with pytest.raises(UnsafeDirectory) as err:
        ensure_private_dir(str(d), "spool_dir")
    assert err.value.key == "spool_dir" and fragment in err.value.reason
    # a group-writable directory is fine for the configured group, when
    # others may not write
    os.chmod(d, 0o770)
    ensure_private_dir(str(d), "socket_dir", group=str(os.lstat(d).st_gid))


def test_symlinked_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeDirectory, match="is a symlink"):
        ensure_private_dir(str(tmp_path / "link"), "data_dir")


def test_directory_under_a_world_writable_parent_is_refused(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)                 # no sticky bit: anyone may rename ours away
    with pytest.raises(UnsafeDirectory, match="parent .* is writable by other users"):
        ensure_private_dir(str(parent / "mine"), "data_dir")


def test_an_explicit_socket_path_in_an_open_directory_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    run = tmp_path / "run"
    out = lastlogin("serve", env={"LASTLOGIN_SOCKET_DIR": str(run),
                                  "LASTLOGIN_DATA_DIR": str(tmp_path / "data"),
                                  "LASTLOGIN_PROTOCOLS": "imap",
                                  "LASTLOGIN_SOCKET_IMAP": str(shared / "imap.sock")})
    assert out.returncode == 2
    assert out.stderr.startswith(f"lastlogin: {shared}: is writable by other users")
    assert out.stderr.endswith(" (socket_imap)\n")
    assert not (shared / "imap.sock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root")
@pytest.mark.parametrize("setting", ["socket_dir", "spool_dir", "data_dir"])
def test_serve_refuses_a_foreign_directory_with_one_line(tmp_path, setting):
    dirs = {k: tmp_path / k for k in ("socket_dir", "spool_dir", "data_dir")}
    for d in dirs.values():
        d.mkdir(mode=0o700)
    os.chown(dirs[setting], OTHER_UID, -1)      # what another user made first
    env = {"LASTLOGIN_" + k.upper(): str(v) for k, v in dirs.items()}
    out = lastlogin("serve", env=env)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"lastlogin: {dirs[setting]}: is owned by uid {OTHER_UID}")
    assert out.stderr.endswith(f" ({setting})\n")
    assert os.listdir(dirs["socket_dir"]) == []         # nothing was bound or written


def test_non_root_without_runtime_dir_has_no_tmp_fallback(monkeypatch):
    from app import config
    monkeypatch.setattr(config.os, "geteuid", lambda: 65534)       # as a non-root user
    for var in ("XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings(environ={})
    assert s.socket_dir == ""
    with pytest.raises(ConfigError) as err:
        s.socket_path("imap")
    assert err.value.key == "socket_dir" and "no /tmp fallback" in err.value.reason
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/65534")
    assert load_settings(environ={}).socket_dir == "/run/user/65534/lastlogin"
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/lastlogin")      # systemd's RuntimeDirectory=
    assert load_settings(environ={}).socket_dir == "/run/lastlogin"


def test_serve_without_a_socket_dir_refuses_with_one_line(tmp_path):
    out = lastlogin("serve", env={"LASTLOGIN_SOCKET_DIR": "", "LASTLOGIN_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2
    assert out.stderr.startswith("lastlogin: not set, and neither $RUNTIME_DIRECTORY nor")
    assert out.stderr.endswith(" (socket_dir)\n")
    assert out.stderr.count("\n") == 1


# --- files -----------------------------------------------------------------

def test_atomic_write_replaces_planted_symlinks(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    (d / "status.json").symlink_to(victim)
    (d / f".status.json.{os.getpid()}.tmp").symlink_to(victim)
    write_file_atomic(str(d), "status.json", b"{}")
    assert victim.read_bytes() == b"precious"
    assert not (d / "status.json").is_symlink()
    assert (d / "status.json").read_bytes() == b"{}"
    assert os.listdir(d) == ["status.json"]


def test_daemon_status_file_does_not_follow_symlinks(sqlite_url, tmp_path):
    victim = tmp_path / "lastlogin.db-copy"
    victim.write_bytes(b"the database")
    d = make_daemon(sqlite_url, protocols="imap")
    d.start()
    try:
        pid = d.proc.pid
        status = Path(d.socket_dir) / "status.json"
        assert wait_for(status.exists)
        # what the hostile review planted: the daemon's own temporary name
        tmp = Path(d.socket_dir) / f".status.json.{pid}.tmp"
        tmp.symlink_to(victim)
        status.unlink()
        status.symlink_to(victim)
        assert wait_for(lambda: not status.is_symlink(), timeout=10)
        assert json.loads(status.read_text())["pid"] == pid
        assert mode(status) == 0o644
    finally:
        d.stop()
    assert victim.read_bytes() == b"the database"


def test_sqlite_database_and_side_files_are_private(tmp_path):
    data = tmp_path / "state"
    out = lastlogin("db", "upgrade", env={"LASTLOGIN_DATA_DIR": str(data)})
    assert out.returncode == 0, out.stderr
    assert mode(data) == 0o700
    db = data / "lastlogin.db"
    assert mode(db) == 0o600
    # the daemon's WAL files take the database file's mode
    d = make_daemon(f"sqlite:///{db}", protocols="imap")
    d.env.pop("LASTLOGIN_DATABASE_URL")
    d.env["LASTLOGIN_DATA_DIR"] = str(data)
    d.start()
    try:
        assert not send_request(d.sock("imap"), request_bytes()).refused
        side = sorted(p.name for p in data.iterdir() if p.name.startswith("lastlogin.db"))
        assert side == ["lastlogin.db", "lastlogin.db-shm", "lastlogin.db-wal"]
        assert {p: mode(data / p) for p in side} == {p: 0o600 for p in side}
        assert mode(data / "spool") == 0o700
    finally:
        d.stop()


def test_database_group_opens_the_database_to_readers(tmp_path):
    gid = os.getgid()
    db = tmp_path / "g" / "lastlogin.db"
    out = lastlogin("db", "upgrade", env={"LASTLOGIN_DATA_DIR": str(db.parent),
                                          "LASTLOGIN_DATABASE_GROUP": str(gid)})
    assert out.returncode == 0, out.stderr
    # created by `db upgrade` through lastlogin's own engine: the group at once
    assert mode(db) == 0o640 and os.lstat(db).st_gid == gid
    # a file made private since is opened to the group again when the daemon starts
    os.chmod(db, 0o600)
    make_engine(f"sqlite:///{db}", file_group=gid, tighten=True).dispose()
    assert mode(db) == 0o640 and os.lstat(db).st_gid == gid
    # a database the CLI creates itself gets the group at once
    fresh = tmp_path / "fresh.db"
    make_engine(f"sqlite:///{fresh}", file_group=gid).dispose()
    assert mode(fresh) == 0o640 and os.lstat(fresh).st_gid == gid


def test_a_world_readable_database_left_by_an_older_version_is_tightened(tmp_path):
    db = tmp_path / "old.db"
    upgrade(f"sqlite:///{db}")
    os.chmod(db, 0o644)
    make_engine(f"sqlite:///{db}").dispose()              # the CLI leaves it alone
    assert mode(db) == 0o644
    make_engine(f"sqlite:///{db}", tighten=True).dispose()  # as the daemon opens it
    assert mode(db) == 0o600


def test_every_command_runs_with_umask_077(tmp_path):
    out = subprocess.run([sys.executable, "-c",
                          "import os, sys; from app.cli import main_group; "
                          "sys.argv=['lastlogin','db','history']; "
                          "import atexit; atexit.register(lambda: print(oct(os.umask(0))));"
                          "main_group()"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items()
                              if not k.startswith("LASTLOGIN_")} |
                         {"LASTLOGIN_DATA_DIR": str(tmp_path)})
    assert out.stdout.splitlines()[-1] == "0o77", out.stderr


# --- CLI output ------------------------------------------------------------

def test_report_output_cannot_steer_a_terminal(db_url, engine):
    with engine.begin() as conn:
        record_logins(conn, [record(HOSTILE), record(b"=cmd|' /C calc'!A0"),
                             record(b"+1+1"), record(b"@SUM(1)")])
    env = {"LASTLOGIN_DATABASE_URL": db_url}
    outs = {}
    for fmt in ("table", "csv", "json"):
        out = subprocess.run([sys.executable, "-m", "app", "report", "last", "--format", fmt],
                             env={k: v for k, v in os.environ.items()
                                  if not k.startswith("LASTLOGIN_")} | env,
                             capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr
        for bad in FORBIDDEN:
            assert bad not in out.stdout, (fmt, bad)
        outs[fmt] = out.stdout.decode()
    # visibly escaped, one row per login (no forged row)
    assert "evil\\x1b]52;c;cm0gLXJmIH4=\\x07\\x1b]0;pwned\\x07\\x0d\\x0aforged " \
           "row\\x9b2J\\u202eoops" in outs["table"]
    assert len(outs["table"].splitlines()) == 1 + 4
    rows = list(csv.reader(io.StringIO(outs["csv"])))
    users = sorted(r[0] for r in rows[1:])
    assert "'=cmd|' /C calc'!A0" in users and "'+1+1" in users and "'@SUM(1)" in users
    assert len(rows) == 1 + 4
    # JSON keeps the exact value (escaped the JSON way)
    data = json.loads(outs["json"])
    assert HOSTILE.decode() in [r["username"] for r in data]


def test_render_escapes_every_format():
    rows = [{"u": "a\x1bb\r\nc", "n": -5}]
    buf = io.StringIO()
    render(rows, ["u", "n"], "csv", buf)
    assert buf.getvalue() == "u,n\na\\x1bb\\x0d\\x0ac,-5\n"     # numbers stay numbers
    buf = io.StringIO()
    render([{"u": "\x9b-x"}], ["u"], "json", buf)
    assert "\x9b" not in buf.getvalue() and json.loads(buf.getvalue()) == [{"u": "\x9b-x"}]


def test_error_lines_escape_what_they_quote(sqlite_url):
    out = lastlogin("report", "refused", "--since", "x\x1b]0;t\x07",
                    env={"LASTLOGIN_DATABASE_URL": sqlite_url})
    assert out.returncode == 2
    assert "\x1b" not in out.stderr and "\x07" not in out.stderr
    assert out.stderr.count("\n") == 1


# --- logs ------------------------------------------------------------------

def log_record(msg: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("lastlogin.test", logging.WARNING, __file__, 1, msg, args,
                             exc_info)


def test_json_log_keys_cannot_be_overwritten_by_user_text():
    rec = log_record("event=login user=%s outcome=%s", "x level=debug event=fake", "denied")
    doc = json.loads(_JSONFormatter().format(rec))
    assert (doc["level"], doc["event"], doc["outcome"]) == ("warning", "login", "denied")
    assert doc["user"] == "x level=debug event=fake"
    # text put into the format string itself cannot win either
    rec = log_record("event=login level=debug logger=x event=again")
    doc = json.loads(_JSONFormatter().format(rec))
    assert (doc["level"], doc["logger"], doc["event"]) == ("warning", "lastlogin.test", "login")
    assert doc["_unparsed"] == "level=debug logger=x event=again"


def test_log_values_are_escaped_in_both_formats():
    rec = log_record("event=x user=%s error=%s", b"a\x1b[2Jb\nlevel=error", ValueError("c\rd"))
    kv = _KVFormatter().format(rec)
    assert "\x1b" not in kv and "\n" not in kv and "\r" not in kv
    assert 'user="a\\x1b[2Jb\\nlevel=error"' in kv and "error=c\\rd" in kv
    js = _JSONFormatter().format(rec)
    assert "\x1b" not in js and "\\n" not in js.replace("\\\\n", "")
    assert json.loads(js)["user"] == "a\\x1b[2Jb\\nlevel=error"


def test_show_of_a_huge_value_is_short():
    # (its speed is not timed here: a loaded CI host made a 10 ms bound flaky)
    text = show(b"\x01" * (1 << 20))
    assert text.endswith('...(1048576 chars)"') and len(text) < 300
    assert show(b"\x01" * (1 << 10) + b"\xff" * ((1 << 20) - (1 << 10))) == text


# --- secrets ---------------------------------------------------------------

def test_malformed_database_url_is_refused_without_showing_it():
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"LASTLOGIN_DATABASE_URL":
                               "postgresql://lastlogin:s3cr@tPassw0rd@db.example/lastlogin"})
    assert err.value.key == "database_url"
    assert "tPassw0rd" not in str(err.value) and "s3cr" not in str(err.value)
    assert "%40" in err.value.reason


def test_redact_url_hides_the_password_however_written():
    assert redact_url("postgresql+psycopg://u:pa%40ss@h/db") == "postgresql+psycopg://u:***@h/db"
    assert "s3cr" not in redact_url("postgresql://u:s3cr@t@h/db")
    assert "tail" not in redact_url("postgresql://u:s3cr@tail@h/db")


def test_secrets_never_reach_log_lines_or_tracebacks():
    set_secrets(["hunter2-pw"])
    try:
        try:
            raise RuntimeError("connect failed for postgresql://u:hunter2-pw@h/db")
        except RuntimeError:
            rec = log_record("event=boom detail=%s", "pw hunter2-pw", exc_info=sys.exc_info())
        for fmt in (_KVFormatter(), _JSONFormatter()):
            line = fmt.format(rec)
            assert "hunter2-pw" not in line and "***" in line and "\n" not in line
    finally:
        set_secrets([])


def test_database_password_stays_out_of_the_daemons_logs_and_status(tmp_path):
    port = free_port()                          # nobody listens: the database is "down"
    url = f"postgresql+psycopg://lastlogin:Pw-{port}-x9@127.0.0.1:{port}/lastlogin"
    metrics = free_port()
    d = make_daemon(url, protocols="imap", spool_dir=str(tmp_path / "spool"),
                    metrics_listen=f"127.0.0.1:{metrics}")
    d.start()
    try:
        assert not send_request(d.sock("imap"), request_bytes()).refused     # spooled
        status = Path(d.socket_dir) / "status.json"
        assert wait_for(status.exists)
        text = status.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            scraped = r.read().decode()
    finally:
        d.stop()
    assert "event=database_unreachable_at_start" in d.logs()
    assert "lastlogin_database_down 1.0" in scraped
    for shown in (d.logs(), text, scraped):
        assert f"Pw-{port}-x9" not in shown


def test_import_reads_the_source_url_from_env_or_file_not_argv(db_url, tmp_path):
    source = tmp_path / "dict.db"
    engine = make_engine(f"sqlite:///{source}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE last_login (userid VARCHAR(255) PRIMARY KEY, "
                             "last_login BIGINT NOT NULL)")
        conn.exec_driver_sql("INSERT INTO last_login VALUES ('alice@example.com', 1764000000)")
    engine.dispose()
    env = {"LASTLOGIN_DATABASE_URL": db_url}
    out = lastlogin("import", "last-login-table", f"sqlite:///{source}", env=env)
    assert out.returncode == 2                  # no URL on the command line
    out = lastlogin("import", "last-login-table", env=env)
    assert out.returncode == 2 and "LASTLOGIN_IMPORT_SOURCE_URL" in out.stderr
    out = lastlogin("import", "last-login-table",
                    env={**env, "LASTLOGIN_IMPORT_SOURCE_URL": f"sqlite:///{source}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 rows read")
    url_file = tmp_path / "url"
    url_file.write_text(f"sqlite:///{source}\n")
    out = lastlogin("import", "last-login-table", "--source-url-file", str(url_file), env=env)
    assert out.returncode == 0, out.stderr


# --- peers -----------------------------------------------------------------

def test_default_peers_are_root_and_the_daemons_user_only():
    s = load_settings(environ={})
    assert s.allowed_uids == tuple(dict.fromkeys(("0", str(os.geteuid()))))
    assert "dovenull" not in s.allowed_uids and "dovecot" not in s.allowed_uids


def test_max_connections_is_sized_to_the_open_file_limit():
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert load_settings(environ={}).max_connections == max(16, (soft - 64) // 3)
    assert load_settings(environ={"LASTLOGIN_MAX_CONNECTIONS": "7"}).max_connections == 7
    assert load_settings(environ={}).max_request_bytes == 64 << 10


def test_restart_successor_command_is_isolated(tmp_path):
    from app.sockets import successor_command
    cmd = successor_command("rel.toml")
    assert cmd[:3] == [sys.executable, "-I", "-c"]
    assert cmd[-3:] == ["--config", os.path.abspath("rel.toml"), "serve"]


def test_status_warns_when_the_daemon_uses_another_database(tmp_path):
    """The CLI run with other settings than the daemon's would write rules the
    daemon never reads: status says so."""
    import time
    from app.config import load_settings
    from app.health import WARNING, checks
    from app.status import DaemonStatus
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    state = DaemonStatus(pid=os.getpid(), written_at=time.time(), rules=0,
                         config_checked_age=1.0,
                         database="postgresql+psycopg://lastlogin:***@db/lastlogin")
    (run / "status.json").write_text(state.to_json())
    settings = load_settings(None, environ={"LASTLOGIN_SOCKET_DIR": str(run),
                                            "LASTLOGIN_DATA_DIR": str(tmp_path / "data"),
                                            "LASTLOGIN_PROTOCOLS": "imap"})
    found = [(lv, name, detail) for lv, name, detail in checks(settings) if name == "settings"]
    assert len(found) == 1 and found[0][0] == WARNING
    assert "another database" in found[0][2] and "***" in found[0][2]
