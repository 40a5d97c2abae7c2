"""Every command, every option and argument, fed invalid values of its type.

The whole click command tree is walked; for each parameter the test gives
values that are wrong for its type (too large, malformed time, bad CIDR,
unknown id, missing or unreadable file, wrong URL, ...) on an otherwise
valid command line, runs it in-process (click's CliRunner, for speed) and
asserts: an exit status from the documented table, at most one line on
stderr (click's own usage message aside), no traceback, and no file in the
sandbox created or changed (the database compared by its full SQL dump).

The cases the issue lists (settings from the environment, `serve`) run as
subprocesses at the end.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from app.cli import main_group
from app.cli.common import EXIT_CODES, EXIT_INTERNAL
from app.db import make_engine
from app.db.migrate import upgrade
from app.db.schema import metadata

TABLE_CODES = set(EXIT_CODES) - {0, EXIT_INTERNAL}
TOO_LARGE = "99999999999999999999"
SERVERS = {("serve",), ("web",)}       # they serve until stopped


def all_commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A migrated SQLite database with one rule and one alert, and input files."""
    base = tmp_path_factory.mktemp("tree")
    data = base / "data"
    data.mkdir()
    db = data / "lastlogin.db"
    upgrade(f"sqlite:///{db}")
    env = {"LASTLOGIN_DATA_DIR": str(data), "LASTLOGIN_SOCKET_DIR": str(base / "run")}
    runner = CliRunner()
    for args in (["rule", "add", "deny", "--user", "x@example.com"], ["alert", "add", "hi"]):
        assert runner.invoke(main_group, args, env=env).exit_code == 0
    (base / "mail.log").write_bytes(
        b"Nov 26 07:00:00 imap-login: Info: Login: user=<a@example.com>, method=PLAIN, "
        b"rip=198.51.100.7, lip=192.0.2.25, mpid=1, session=<S>\n")
    (base / "cut.log.gz").write_bytes(gzip.compress(b"x" * 100000)[:30])
    (base / "a-directory").mkdir()
    src = sqlite3.connect(base / "dict.db")
    src.execute("CREATE TABLE last_login (userid TEXT, last_login BIGINT)")
    src.execute("INSERT INTO last_login VALUES ('a@example.com', 1764000000123)")
    src.commit()
    src.close()
    # The source URL is read from a file (or the environment), never argv.
    for name, url in SOURCE_URL_FILES.items():
        (base / name).write_text(url.format(base=base) + "\n")
    return base, env


SOURCE_URL_FILES = {
    "dict.url": "sqlite:///{base}/dict.db",
    "empty.url": "",
    "bad-port.url": "mysql://x@127.0.0.1:abc/db",
    "nosuch.url": "nosuch://x",
    "no-sqlite-file.url": "sqlite:////nonexistent/dict.db",
    "pg-down.url": "postgresql://nobody@127.0.0.1:1/none",
    "mysql-down.url": "mysql://nobody@127.0.0.1:1/none",
}


def snapshot(base) -> dict[str, str]:
    """Every file and directory under ``base``; databases by their SQL dump."""
    out = {}
    for root, dirs, files in os.walk(base):
        for d in dirs:
            out[os.path.join(root, d)] = "dir"
        for f in files:
            path = os.path.join(root, f)
            if f.endswith(("-wal", "-shm", "-journal")):
                continue        # SQLite's own; the dump below covers their content
            if f.endswith(".db"):
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                text = "\n".join(conn.iterdump())
                conn.close()
                out[path] = hashlib.sha256(text.encode()).hexdigest()
            else:
                with open(path, "rb") as fh:
                    out[path] = hashlib.sha256(fh.read()).hexdigest()
    return out


@dataclass
class Case:
    path: tuple[str, ...]
    param: str
    argv: list[str]
    codes: set[int]


# A valid command line per command: (positional arguments, options).
def baselines(base) -> dict[tuple[str, ...], tuple[list[str], list[str]]]:
    return {
        ("db", "upgrade"): ([], []),
        ("db", "downgrade"): (["head"], []),
        ("db", "current"): ([], []),
        ("db", "history"): ([], []),
        ("db", "check"): ([], []),
        ("rule", "add"): (["deny"], ["--user", "y@example.com"]),
        ("rule", "list"): ([], []),
        ("rule", "show"): (["1"], []),
        ("rule", "remove"): (["1"], []),
        ("rule", "enable"): (["1"], []),
        ("rule", "disable"): (["1"], []),
        ("check",): (["bob@example.com", "192.0.2.1"], []),
        ("override", "set"): (["mail", "maildir:/x"], ["--user", "u@example.com"]),
        ("override", "unset"): (["mail"], ["--user", "u@example.com"]),
        ("override", "list"): ([], []),
        ("alert", "add"): (["hello"], []),
        ("alert", "list"): ([], []),
        ("alert", "remove"): (["1"], []),
        ("report", "last"): ([], []),
        ("report", "inactive"): ([], ["--days", "30"]),
        ("report", "history"): (["a@example.com"], []),
        ("report", "ips"): (["a@example.com"], []),
        ("report", "refused"): ([], []),
        ("report", "failed"): ([], []),
        ("report", "daily"): ([], []),
        ("report", "new-locations"): ([], []),
        ("user", "export"): (["a@example.com"], []),
        ("user", "forget"): (["a@example.com"], ["--yes"]),
        ("prune",): ([], ["--older-than", "30d", "--dry-run"]),
        ("import", "dovecot-log"): ([str(base / "mail.log")], []),
        ("import", "last-login-table"): ([], ["--source-url-file", str(base / "dict.url")]),
        ("status",): ([], []),
        ("serve",): ([], []),
        ("web",): ([], []),
    }


TIME = ["2026-13-45", "yesterday", "9999-12-31T23:59:59-01:00"]
DURATION = ["1m", "forever", "0d", "99999999999d"]
INVALID_BY_NAME: dict[str, list[tuple[str, set[int]]]] = {
    "start": [(v, {2}) for v in TIME],
    "until": [(v, {2}) for v in TIME],
    "at": [(v, {2}) for v in TIME],
    "since": [(v, {2}) for v in TIME + ["1m", "99999999999d"]],
    "duration": [(v, {2}) for v in DURATION],
    "older_than": [(v, {2}) for v in DURATION],
    "network": [("10.0.0.300/8", {2}), ("::g/64", {2}), ("203.0.113.0/33", {2})],
    "local_network": [("10.0.0.300/8", {2}), ("not/a/net", {2})],
    "ip": [("not-an-ip", {2}), ("999.1.1.1", {2})],
    "local_ip": [("not-an-ip", {2}), ("1.2.3.4/8", {2})],
    "protocol": [("smtp", {2})],
    "revision": [("nosuchrev", {2}), ("+99", {2}), ("-99", {2})],
    "rule_id": [("999999", {1}), (TOO_LARGE, {1, 2}), ("abc", {2})],
    "alert_id": [("999999", {1}), (TOO_LARGE, {1, 2}), ("abc", {2})],
    "table": [("no_such_table", {2})],
    "user_column": [("no_such_column", {2})],
    "time_column": [("no_such_column", {2})],
    "country": [("DEU", {2}), ("D1,AT", {2}), ("DE,,AT", {2})],
    "asn": [("AS-1", {2}), ("99999999999", {2}), ("3320,x", {2})],
}
# Free text (usernames, messages, keys, values): any text is a valid value;
# they are exercised with a missing value or argument only.
FREE_TEXT = {"user", "domain", "message", "comment", "username", "key", "value", "action",
             "host"}


def invalid_values(cmd_path, param: click.Parameter, base) -> list[tuple[str, set[int]]]:
    values = list(INVALID_BY_NAME.get(param.name, []))
    kind = param.type
    if isinstance(kind, click.Choice):
        values.append(("nosuch", {2}))
    if isinstance(kind, (click.types.IntParamType, click.IntRange)):
        values += [(TOO_LARGE, {2}), ("-" + TOO_LARGE, {2}), ("12abc", {2})]
        if isinstance(kind, click.IntRange) and kind.min is not None:
            values.append((str(kind.min - 1), {2}))
    if isinstance(kind, (click.Path, click.File)):
        values += [(str(base / "missing.log"), {2}), (str(base / "a-directory"), {2})]
    if cmd_path == ("import", "dovecot-log") and param.name == "files":
        values.append((str(base / "cut.log.gz"), {2}))          # a truncated .gz
    if cmd_path == ("import", "last-login-table") and param.name == "source_url_file":
        values += [(str(base / "empty.url"), {2}), (str(base / "bad-port.url"), {2}),
                   (str(base / "nosuch.url"), {2}), (str(base / "no-sqlite-file.url"), {2}),
                   (str(base / "pg-down.url"), {4}), (str(base / "mysql-down.url"), {4})]
    if cmd_path == ("import", "last-login-table") and param.name == "precision":
        values.append(("s", {2}))                                # the data is milliseconds
    return values


def cases(base) -> list[Case]:
    out = []
    lines = baselines(base)
    for path, cmd in all_commands(main_group):
        if path in SERVERS:
            continue                    # runs a server; its bad settings are tested below
                                        # (and in tests/test_web.py)
        positional, options = lines[path]
        args = [p for p in cmd.params if isinstance(p, click.Argument)]
        for param in cmd.params:
            if param.name == "help" or getattr(param, "is_flag", False) or \
                    getattr(param, "is_bool_flag", False):
                continue
            if isinstance(param, click.Option) and param.secondary_opts and \
                    param.type is click.BOOL:
                continue
            if param.name == "fmt":
                values = [("nosuch", {2})]
            else:
                values = invalid_values(path, param, base)
            for value, codes in values:
                if isinstance(param, click.Argument):
                    i = args.index(param)
                    pos = list(positional)
                    if param.nargs == -1:
                        pos = [value]
                    elif i < len(pos):
                        pos[i] = value
                    else:
                        pos.append(value)       # an optional argument
                    argv = [*path, *pos, *options]
                else:
                    opt = param.opts[0]
                    kept = _without(options, opt)
                    argv = [*path, *positional, *kept, opt, value]
                out.append(Case(path, param.name, argv, codes))
            # a missing value or argument: click's own usage error
            if isinstance(param, click.Option):
                out.append(Case(path, param.name, [*path, *positional,
                                                   *_without(options, param.opts[0]),
                                                   param.opts[0]], {2}))
            elif param.required and positional:
                i = args.index(param)
                out.append(Case(path, param.name, [*path, *positional[:i]], {2}))
    return out


def _without(options: list[str], opt: str) -> list[str]:
    out, skip = [], False
    for i, o in enumerate(options):
        if skip:
            skip = False
            continue
        if o == opt:
            skip = True
            continue
        out.append(o)
    return out


def test_every_command_has_a_baseline_and_every_parameter_a_case(sandbox):
    base, _ = sandbox
    lines = baselines(base)
    paths = {p for p, _ in all_commands(main_group)}
    assert paths == set(lines), paths ^ set(lines)
    covered = {(c.path, c.param) for c in cases(base)}
    for path, cmd in all_commands(main_group):
        if path in SERVERS:
            continue
        for param in cmd.params:
            if param.name == "help" or getattr(param, "is_flag", False):
                continue
            if isinstance(param, click.Option) and param.type is click.BOOL:
                continue
            assert (path, param.name) in covered, (path, param.name)
            typed = [c for c in cases(base) if (c.path, c.param) == (path, param.name)]
            if param.name not in FREE_TEXT:
                assert len(typed) >= 2, (path, param.name)      # a typed value, not only "missing"


def walk_tree(base, env, snap) -> list[str]:
    """Run every case; the problems found, one line each."""
    runner = CliRunner()
    clean = {k: None for k in os.environ if k.startswith("LASTLOGIN_")
             and not k.startswith(("LASTLOGIN_TEST_", "LASTLOGIN_BENCH_"))}
    before = snap()
    failures = []
    all_cases = cases(base)
    assert len(all_cases) > 150
    for case in all_cases:
        result = runner.invoke(main_group, case.argv, env={**clean, **env})
        problems = []
        code = result.exit_code
        if code not in TABLE_CODES or code not in case.codes:
            problems.append(f"exit {code}, expected {sorted(case.codes)}")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            problems.append(f"exception {type(result.exception).__name__}: {result.exception}")
        stderr = result.stderr
        if "Traceback" in stderr or "Traceback" in result.stdout:
            problems.append("traceback")
        usage = ("Usage:" in stderr and "Error:" in stderr) or (
            code == 2 and stderr.startswith("Error: ") and len(stderr.splitlines()) == 1)
        if not usage:
            if len(stderr.splitlines()) > 1:
                problems.append(f"{len(stderr.splitlines())} lines on stderr")
            if code in (2, 3, 4) and not stderr.startswith("lastlogin: "):
                problems.append("no 'lastlogin: ' line")
        after = snap()
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            problems.append(f"files changed: {changed[:3]}")
            before = after
        if problems:
            failures.append(f"{' '.join(case.argv)}: {'; '.join(problems)}; "
                            f"stderr={stderr!r}")
    return failures


def test_the_whole_tree_with_invalid_values(sandbox):
    base, env = sandbox
    failures = walk_tree(base, env, lambda: snapshot(base))
    assert not failures, "\n".join(failures)


def test_the_whole_tree_on_postgresql(sandbox, pg_cluster):
    """The same cases with the database on PostgreSQL: nothing in it changes either."""
    base, _ = sandbox
    url = pg_cluster.create_database()
    upgrade(url)
    env = {"LASTLOGIN_DATABASE_URL": url, "LASTLOGIN_SOCKET_DIR": str(base / "run"),
           "LASTLOGIN_DATA_DIR": str(base / "pg-data")}
    runner = CliRunner()
    for args in (["rule", "add", "deny", "--user", "x@example.com"], ["alert", "add", "hi"]):
        assert runner.invoke(main_group, args, env=env).exit_code == 0
    engine = make_engine(url)

    def snap():
        out = snapshot(base)
        with engine.connect() as conn:
            for table in metadata.sorted_tables:
                rows = conn.execute(sa.select(table)).all()
                out[f"pg:{table.name}"] = hashlib.sha256(
                    repr(sorted(map(repr, rows))).encode()).hexdigest()
        return out

    try:
        failures = walk_tree(base, env, snap)
    finally:
        engine.dispose()
    assert not failures, "\n".join(failures)


# --- the cases the issue lists, as an operator runs them -----------------------

def run(args, env, timeout=60):
    full = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "app", *args], env=full, capture_output=True,
                          text=True, timeout=timeout)


def one_line(out, code: int, *fragments: str) -> None:
    """Exit ``code``; one `lastlogin:` line on stderr (daemon log lines aside)."""
    lines = [ln for ln in out.stderr.splitlines() if " level=" not in ln
             and not ln.startswith("lastlogin 0.")]           # serve's log and start line
    assert out.returncode == code, out.stderr
    assert len(lines) == 1 and lines[0].startswith("lastlogin: "), out.stderr
    assert "Traceback" not in out.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_listed_settings_cases_give_one_line(sandbox, tmp_path):
    base, env = sandbox
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    long_dir = tmp_path / ("d" * 110)
    serve_cases = [
        ({"LASTLOGIN_SOCKET_DIR": str(a_file)}, str(a_file), "(socket_dir)"),
        ({"LASTLOGIN_SOCKET_DIR": "/proc/lastlogin-test/run"}, "/proc/lastlogin-test",
         "(socket_dir)"),
        ({"LASTLOGIN_SOCKET_DIR": str(long_dir)}, "too long", "(socket_dir)"),
        ({"LASTLOGIN_DATABASE_URL": "postgresql://u@127.0.0.1:abc/db"}, "not a database URL",
         "(database_url)"),
    ]
    for extra, *fragments in serve_cases:
        one_line(run(["serve"], {**env, **extra}, timeout=30), 2, *fragments)
    status = run(["status"], {**env, "LASTLOGIN_DATABASE_URL": "postgresql://u@h:abc/db"})
    one_line(status, 2, "not a database URL", "(database_url)")     # checked when loaded
    one_line(run(["rule", "list"], {"LASTLOGIN_DATA_DIR": "/proc/nope"}), 3,
             "no database at /proc/nope/lastlogin.db", "(data_dir)")
    one_line(run(["db", "upgrade"], {"LASTLOGIN_DATA_DIR": "/proc/nope"}), 2,
             "/proc/nope", "(data_dir)")
    one_line(run(["rule", "list"],
                 {"LASTLOGIN_DATABASE_URL": "postgresql://u@127.0.0.1:abc/db"}), 2,
             "(database_url)")
    big = run(["rule", "add", "deny", "--priority", TOO_LARGE, "--user", "x"], env)
    assert big.returncode == 2 and "Traceback" not in big.stderr
    assert "Error: Invalid value for '--priority'" in big.stderr      # click's usage message
    one_line(run(["db", "upgrade", "nosuchrev"], env), 2, "nosuchrev", "(REVISION)")
    one_line(run(["import", "last-login-table"],
                 {**env, "LASTLOGIN_IMPORT_SOURCE_URL": "mysql://nobody@127.0.0.1:1/mail"}), 4,
             "(LASTLOGIN_IMPORT_SOURCE_URL)")
    assert not os.path.exists("/proc/nope")


def test_config_anywhere_and_debug_traceback(sandbox, tmp_path):
    base, env = sandbox
    conf = tmp_path / "lastlogin.toml"
    conf.write_text(f'data_dir = "{base / "data"}"\n')
    runner = CliRunner()
    clean = {k: None for k in os.environ if k.startswith("LASTLOGIN_")}
    for argv in (["--config", str(conf), "rule", "list"], ["rule", "list", "--config", str(conf)],
                 ["rule", "--config", str(conf), "list"], ["rule", "list", f"--config={conf}"]):
        result = runner.invoke(main_group, argv, env=clean)
        assert result.exit_code == 0, (argv, result.output)
        assert "x@example.com" in result.stdout
    bad = runner.invoke(main_group, ["db", "upgrade", "nosuchrev", "--config", str(conf)],
                        env=clean)
    assert bad.exit_code == 2 and bad.stderr == (
        "lastlogin: Can't locate revision identified by 'nosuchrev' (REVISION)\n")
    debug = run(["db", "upgrade", "nosuchrev", "--config", str(conf), "--debug"], {})
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    # an option's value that looks like a global option stays that option's value
    for word in ("--debug", "--config"):
        added = runner.invoke(main_group, ["rule", "add", "deny", "--user", "y@example.com",
                                           "--comment", word, "--config", str(conf)], env=clean)
        assert added.exit_code == 0, added.output
        rid = added.stdout.split()[-1]
        shown = runner.invoke(main_group, ["rule", "show", rid, "--format", "json",
                                           f"--config={conf}"], env=clean)
        assert json.loads(shown.stdout)[0]["comment"] == word


def test_newer_schema_is_named_and_not_advised_to_upgrade(tmp_path):
    data = tmp_path / "data"
    env = {"LASTLOGIN_DATA_DIR": str(data)}
    assert run(["db", "upgrade"], env).returncode == 0
    conn = sqlite3.connect(data / "lastlogin.db")
    conn.execute("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")
    conn.commit()
    conn.close()
    message = ("lastlogin: the database is at revision f00dfeedbeef, newer than this "
               "lastlogin knows (was lastlogin downgraded?)\n")
    for args in (["rule", "list"], ["db", "upgrade"], ["db", "downgrade", "-1"],
                 ["report", "last"]):
        out = run(args, env)
        assert (out.returncode, out.stderr) == (3, message), args
    current = run(["db", "current"], env)
    assert current.returncode == 3 and current.stdout.startswith("f00dfeedbeef (newer than")
    assert "upgrade" not in current.stdout


def test_relative_revisions_without_double_dash(tmp_path):
    env = {"LASTLOGIN_DATA_DIR": str(tmp_path / "data")}
    assert run(["db", "upgrade"], env).returncode == 0
    down = run(["db", "downgrade", "-1"], env)
    assert down.returncode == 0, down.stderr
    assert "(behind, head is" in run(["db", "current"], env).stdout
    assert run(["db", "upgrade", "+1"], env).returncode == 0
    assert run(["db", "current"], env).stdout.endswith("(head)\n")


def test_read_only_commands_create_nothing(tmp_path):
    env = {"LASTLOGIN_DATA_DIR": str(tmp_path / "state" / "lastlogin"),
           "LASTLOGIN_SOCKET_DIR": str(tmp_path / "run")}
    for args, code in ((["db", "current"], 3), (["report", "last"], 3), (["rule", "list"], 3),
                       (["alert", "list"], 3), (["db", "check"], 3), (["status"], 2),
                       (["prune", "--older-than", "30d", "--dry-run"], 3)):
        out = run(args, env)
        assert out.returncode == code, (args, out.stderr)
    assert os.listdir(tmp_path) == []
