"""No SQL text is built from user data: every formatted SQL string is listed here.

The test reads the code (AST): any f-string, %-format or .format() handed to
text()/execute()/exec_driver_sql() must interpolate only names on the
allowlist, which are identifiers the code makes itself (partition names from
integers, the NOTIFY channel constant, table names in migrations).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.db.rules import add_rule, list_rules
from app.db.overrides import list_overrides, set_override
from tests.harness.cli import lastlogin

ROOT = Path(__file__).resolve().parents[1]
SQL_CALLS = {"text", "execute", "exec_driver_sql"}
ALLOWED = {
    "app/db/partitions.py": {"name", "lo.isoformat()", "hi.isoformat()"},
    "app/snapshot.py": {"NOTIFY_CHANNEL"},
    # migrations interpolate their own constants: table, view, index names
    "migrations": {"table", "event", "view", "name", "column", "text", "COLUMNS", "idle",
                   "day", "event.lower()", "PROTOCOL_CHECK", "check"},
}


def formatted_sql(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name not in SQL_CALLS:
            continue
        arg = node.args[0]
        if isinstance(arg, ast.JoinedStr):
            yield node.lineno, {ast.unparse(v.value) for v in arg.values
                                if isinstance(v, ast.FormattedValue)}
        elif isinstance(arg, ast.BinOp) and isinstance(arg.op, (ast.Mod, ast.Add)):
            yield node.lineno, {"<concatenated or %-formatted SQL>"}
        elif (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
              and arg.func.attr == "format"):
            yield node.lineno, {"<.format() SQL>"}


def test_formatted_sql_only_interpolates_our_own_identifiers():
    found = {}
    for path in list((ROOT / "app").rglob("*.py")) + list((ROOT / "migrations").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        allowed = ALLOWED.get("migrations" if rel.startswith("migrations/") else rel, set())
        for line, names in formatted_sql(path):
            bad = names - allowed
            assert not bad, f"{rel}:{line} builds SQL from {sorted(bad)}"
            found[rel] = found.get(rel, 0) + 1
    assert "app/db/partitions.py" in found        # the check does see f-strings


PAYLOADS = ["x'; DROP TABLE access_rules; --", 'a") OR 1=1 --', "\\'; SELECT pg_sleep(5); --",
            "%s%s%(x)s", "$1; TRUNCATE last_logins"]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_every_write_path_stores_payloads_as_data(engine, payload):
    with engine.begin() as conn:
        add_rule(conn, action="deny", username=payload, domain=payload, message=payload,
                 comment=payload)
        # a % in an override value starts a template variable: %% is a literal %
        set_override(conn, "user", payload, "note", payload.replace("%", "%%"))
    with engine.connect() as conn:
        (rule,) = list_rules(conn)
        assert rule["username"] == payload and rule["message"] == payload
        (ov,) = list_overrides(conn)
        assert ov["scope_value"] == payload and ov["value"] == payload.replace("%", "%%")
        assert set(sa.inspect(conn).get_table_names()) >= {"access_rules", "last_logins"}


@pytest.mark.parametrize("payload", PAYLOADS[:2])
def test_every_read_path_takes_payloads_as_data(db_url, payload):
    env = {"LASTLOGIN_DATABASE_URL": db_url}
    for args in (["report", "last", "--user", payload], ["report", "last", "--domain", payload],
                 ["report", "history", payload], ["report", "ips", payload],
                 ["check", payload, "192.0.2.1"], ["override", "list", "--user", payload]):
        out = lastlogin(*args, env=env)
        assert out.returncode in (0, 1), (args, out.stderr)     # rows or none; no error
