"""The module map of docs/architecture.md, enforced.

Every module of app/ has a layer; a module imports only from its own layer
or below (nothing imports upward), and the pure layer imports no I/O at all
(no sockets, files, threads, databases or event loop). A new module must be
given its layer here and a line in docs/architecture.md.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
APP = ROOT / "app"

# Lower numbers first; a module may import its own layer and lower ones.
LAYERS = {
    # 0 pure: what a login is, the wire format, decisions and plans
    "errors": 0, "login": 0, "protocol": 0, "policy": 0, "templates": 0, "overrides": 0,
    "timeparse": 0, "attempts": 0,
    # 1 infrastructure: settings, logs, status, files, sockets syscalls, database
    "config": 1, "logs": 1, "status": 1, "safedirs": 1, "fdio": 1, "worker": 1,
    "metrics": 1, "sysgroups": 1, "db": 1, "geoip": 1,
    # 2 state kept beside the login path: spool, recorder, rules in memory, hooks
    "spool": 2, "recorder": 2, "lane": 2, "snapshot": 2, "maintenance": 2, "nexthop": 2,
    "importer": 2, "health": 2, "notify": 2,
    # 3 one login
    "service": 3, "authpolicy": 3,
    # 4 the sockets around it
    "sockets": 4, "server": 4, "policyhttp": 4,
    # 5 composition and lifecycle
    "daemon": 5,
    # 6 the edges operators use: the command line, the read-only dashboard
    "cli": 6, "web": 6, "__main__": 6, "migrations": 6,
}
PURE_STDLIB = {"__future__", "dataclasses", "datetime", "enum", "functools", "hashlib",
               "ipaddress", "random", "re", "typing", "uuid", "collections", "string",
               "calendar", "json"}


def modules():
    for path in sorted(APP.rglob("*.py")):
        rel = path.relative_to(APP)
        if rel.parts[0] in ("__pycache__",) or rel == pathlib.Path("__init__.py"):
            continue
        yield rel, ast.parse(path.read_text())


def top(rel: pathlib.Path) -> str:
    return rel.parts[0].removesuffix(".py")


def imports(rel: pathlib.Path, tree: ast.AST):
    """(lastlogin top-level modules imported, other top-level packages imported)."""
    ours, other = set(), set()
    depth = len(rel.parts) - 1          # package depth of this file inside app/
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up < depth:          # within our own package: app/<pkg>/...
                    ours.add(rel.parts[0])
                    continue
                if node.module:
                    ours.add(node.module.split(".")[0])
                else:           # from .. import x: a module, or a name of app/__init__
                    ours.update(a.name if a.name in LAYERS else "app" for a in node.names)
            elif node.module and node.module.split(".")[0] == "app":
                parts = node.module.split(".")
                ours.add(parts[1] if len(parts) > 1 else "app")
            elif node.module:
                other.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name.split(".")
                if name[0] == "app":
                    ours.add(name[1] if len(name) > 1 else "app")
                else:
                    other.add(name[0])
    return {o.removesuffix(".py") for o in ours}, other


def test_every_module_has_a_layer():
    missing = sorted({top(rel) for rel, _ in modules()} - set(LAYERS))
    assert missing == [], f"give these a layer in tests/test_architecture.py: {missing}"


@pytest.mark.parametrize("rel,tree", list(modules()), ids=lambda v: str(v)
                         if isinstance(v, pathlib.Path) else "")
def test_no_module_imports_upward(rel, tree):
    mine = LAYERS[top(rel)]
    ours, _ = imports(rel, tree)
    upward = sorted(m for m in ours - {top(rel), "app"} if LAYERS.get(m, 99) > mine)
    assert upward == [], f"{rel} (layer {mine}) imports upward: {upward}"


@pytest.mark.parametrize("rel,tree", [(r, t) for r, t in modules() if LAYERS[top(r)] == 0],
                         ids=lambda v: str(v) if isinstance(v, pathlib.Path) else "")
def test_pure_modules_do_no_io(rel, tree):
    _, other = imports(rel, tree)
    assert other <= PURE_STDLIB, f"{rel} is pure but imports {sorted(other - PURE_STDLIB)}"


def test_the_map_in_the_docs_names_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [m for m in LAYERS if m not in ("__main__", "migrations")
               and f"`{m}" not in doc]
    assert missing == [], f"docs/architecture.md does not describe: {missing}"
