"""Every shell example in README.md and docs/ runs as written, or says why not.

The convention (checked here, so no block slips through):

* every fenced code block names its language: `sh` (commands), `console`
  (`$ command` lines followed by their output), `conf`, `toml`, `sql`, `text`;
* `sh` and `console` blocks are run, in document order, against a
  throw-away database (SQLite and PostgreSQL), each command without a shell;
  a `console` block's output must match exactly, and its commands may exit 0
  or 1 (`check` refusing, a report without rows);
* `<!-- output varies: why -->` right before a `console` block: the commands
  run and must exit 0; the first line of each output must match once numbers
  and runs of spaces are set aside (dates and column widths change by day);
* `<!-- illustrative: why -->` right before a block: not run (it needs
  Dovecot, systemd, doveadm, a mail server's logs, ...);
* `toml` blocks are lastlogin settings, loaded by lastlogin's own loader;
* `conf` blocks are Dovecot configuration: each is checked by the real
  `doveconf` — Dovecot 2.3, or 2.4 (the test chroot) when the block starts
  with `dovecot_config_version`.

Links to files are checked too: they stay inside the repository, the file
exists, and a `#section` exists as a heading there.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.db import make_engine
from app.db.rules import add_rule
from app.db.store import record_logins
from tests.builders import record

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"sh", "console", "conf", "toml", "sql", "text"}
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARK = re.compile(r"^<!--\s*(illustrative|output varies)\s*:\s*\S.*-->\s*$")


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    text: str
    mark: str | None        # "illustrative", "output varies" or None

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    out: list[Block] = []
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        mark = _MARK.match(prev)
        out.append(Block(doc, start + 1, m.group(1), "\n".join(lines[start + 1:j]),
                         mark.group(1) if mark else None))
        i = j + 1
    return out


def commands(block: Block) -> list[tuple[list[str], list[str]]]:
    """(argv, expected output lines) per command; continuation lines joined."""
    out: list[tuple[list[str], list[str]]] = []
    pending = ""
    for raw in block.text.splitlines():
        if block.lang == "console" and not pending and not raw.startswith("$ "):
            if out:
                out[-1][1].append(raw)
            continue
        line = raw[2:] if block.lang == "console" and not pending else raw
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((shlex.split(pending + line), []))
        pending = ""
    for _, expected in out:
        while expected and not expected[-1].strip():
            expected.pop()
    return out


ALL = [b for doc in DOCS for b in blocks(doc)]


def test_every_block_names_its_language_and_runs_or_says_why_not():
    assert ALL, "no code blocks found"
    for b in ALL:
        assert b.lang in LANGUAGES, f"{b.where()}: fence without a known language ({b.lang!r})"
        if b.mark == "output varies":
            assert b.lang == "console", f"{b.where()}: 'output varies' is for console blocks"
        if b.lang in ("sh", "console") and b.mark != "illustrative":
            for argv, _ in commands(b):
                assert argv[0] == "lastlogin", (
                    f"{b.where()}: {argv[0]!r} cannot run here: mark the block "
                    "<!-- illustrative: why -->")
                assert not any(t in (";", "|", ">", "&&") for t in argv), b.where()


def test_links_stay_in_the_repository_and_resolve():
    link = re.compile(r"\]\(([^)\s]+)\)")
    for doc in DOCS:
        for target in link.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue                            # http(s), mailto
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert ROOT in file.parents or file == ROOT, f"{doc.name}: {target} leaves the repo"
            assert file.exists(), f"{doc.name}: {target} does not exist"
            if anchor:
                assert anchor in _anchors(file), f"{doc.name}: no section #{anchor} in {file.name}"


def _anchors(file: Path) -> set[str]:
    out = set()
    for line in file.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
            out.add(slug)
    return out


def lastlogin(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LASTLOGIN_")}
    full.update(env)
    full["TZ"] = "UTC"          # the documented outputs are in UTC
    return subprocess.run([sys.executable, "-m", "app", *argv[1:]], env=full,
                          capture_output=True, text=True, timeout=60)


def _shape(line: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\d+", "N", line)).strip()


def run_blocks(doc: Path, env: dict[str, str]) -> int:
    ran = 0
    for b in blocks(doc):
        if b.lang not in ("sh", "console") or b.mark == "illustrative":
            continue
        for argv, expected in commands(b):
            out = lastlogin(argv, env)
            ran += 1
            shown = " ".join(argv)
            assert "Traceback" not in out.stderr, (b.where(), shown, out.stderr)
            if b.lang == "sh" or b.mark == "output varies":
                assert out.returncode == 0, (b.where(), shown, out.stderr)
            else:
                assert out.returncode in (0, 1), (b.where(), shown, out.stderr)
            if b.lang != "console":
                continue
            got = out.stdout.rstrip("\n").splitlines()
            if b.mark == "output varies":
                assert got and _shape(got[0]) == _shape(expected[0]), (b.where(), shown, got)
            else:
                assert got == expected, (b.where(), shown, out.stdout)
    return ran


@pytest.fixture
def docs_env(empty_db_url, tmp_path):
    env = {"LASTLOGIN_DATABASE_URL": empty_db_url, "LASTLOGIN_DATA_DIR": str(tmp_path / "data"),
           "LASTLOGIN_SOCKET_DIR": str(tmp_path / "run")}
    up = lastlogin(["lastlogin", "db", "upgrade"], env)
    assert up.returncode == 0, up.stderr
    return env


def test_readme_examples_run(docs_env):
    assert run_blocks(ROOT / "README.md", docs_env) >= 10


def test_dovecot_doc_examples_run(docs_env):
    run_blocks(ROOT / "docs" / "dovecot.md", docs_env)


def test_reporting_examples_run(docs_env):
    """On the database the document describes, with times relative to today."""
    now = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
    day = dt.timedelta(days=1)
    engine = make_engine(docs_env["LASTLOGIN_DATABASE_URL"])
    try:
        with engine.begin() as conn:
            rid = add_rule(conn, action="deny", remote_network="203.0.113.0/24",
                           message="Blocked: password spraying")
            recs = [record(b"alice@example.com", at=now - i * day,
                           remote_ip="2001:db8::25" if i % 2 == 0 else "198.51.100.7")
                    for i in range(6)]
            recs.append(record(b"alice@example.com", protocol="pop3",
                               at=now - day - dt.timedelta(hours=3)))
            recs += [record(b"bob@example.com", at=now - 2 * day, remote_ip="192.0.2.77"),
                     record(b"bob@example.com", protocol="pop3", at=now - dt.timedelta(hours=1),
                            remote_ip="192.0.2.77")]
            recs.append(record(b"carol@example.org", at=now - 240 * day,
                               remote_ip="198.51.100.99"))
            recs += [record(b"mallory@example.com", at=now - i * day, remote_ip=ip,
                            outcome="denied", rule_id=rid)
                     for i, ip in ((0, "203.0.113.51"), (1, "203.0.113.50"))]
            record_logins(conn, recs)
    finally:
        engine.dispose()
    assert run_blocks(ROOT / "docs" / "reporting.md", docs_env) >= 9


DOVECOT24_ROOT = Path(os.environ.get("LASTLOGIN_TEST_DOVECOT24_ROOT",
                                     "/var/cache/lastlogin/trixie-dovecot"))


def _doveconf_23(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    conf = tmp_path / "dovecot.conf"
    conf.write_text(f"ssl = no\nbase_dir = {tmp_path / 'run'}\n{text}\n")
    return subprocess.run(["doveconf", "-n", "-c", str(conf)], capture_output=True,
                          text=True, timeout=30)


def _doveconf_24(text: str) -> subprocess.CompletedProcess:
    lines = text.splitlines()
    head = [ln for ln in lines if ln.startswith(("dovecot_config_version",
                                                  "dovecot_storage_version"))]
    rest = [ln for ln in lines if ln not in head]
    inside = "/srv/lastlogin-doc-example"
    outside = DOVECOT24_ROOT / inside.lstrip("/")
    outside.mkdir(parents=True, exist_ok=True)
    try:
        (outside / "dovecot.conf").write_text(
            "\n".join([*head, "ssl = no", f"base_dir = {inside}/run", *rest]) + "\n")
        return subprocess.run(["chroot", str(DOVECOT24_ROOT), "doveconf", "-n", "-c",
                               f"{inside}/dovecot.conf"], capture_output=True, text=True,
                              timeout=30)
    finally:
        import shutil
        shutil.rmtree(outside, ignore_errors=True)


def test_dovecot_configuration_examples_are_valid(tmp_path):
    checked = 0
    for b in ALL:
        if b.lang != "conf" or b.mark == "illustrative":
            continue
        if b.text.lstrip().startswith("dovecot_config_version"):
            assert (DOVECOT24_ROOT / "usr/sbin/dovecot").exists(), (
                f"{b.where()}: the Dovecot 2.4 root {DOVECOT24_ROOT} is needed (scripts/test)")
            out = _doveconf_24(b.text)
        else:
            out = _doveconf_23(b.text, tmp_path)
        assert out.returncode == 0, (b.where(), out.stderr)
        checked += 1
    assert checked >= 5


def test_settings_examples_load(tmp_path):
    from app.config import load_settings
    checked = 0
    for b in ALL:
        if b.lang != "toml" or b.mark == "illustrative":
            continue
        path = tmp_path / f"example-{checked}.toml"
        path.write_text(b.text + "\n")
        load_settings(str(path), {})        # raises ConfigError naming the key
        checked += 1
    assert checked >= 2
