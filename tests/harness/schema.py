"""The whole schema of a database as plain data, to compare two states.

Read from the catalogs, not from SQLAlchemy's reflection (which sees no
triggers or functions, and lists views apart from tables): on PostgreSQL
pg_catalog and information_schema of the ``public`` schema, on SQLite
sqlite_master and its PRAGMAs. Two snapshots are equal when every table,
column (name, type, nullability, default), index, constraint, view (with
its definition), trigger, function, sequence and enum type is the same.
"""

from __future__ import annotations

import re

import sqlalchemy as sa

PG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, data_type, udt_name, character_maximum_length,
               is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = 'public'""",
    "tables": """
        SELECT c.relname, c.relkind, coalesce(pg_get_partkeydef(c.oid), '')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'f')""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'""",
    "constraints": """
        SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid)
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'""",
    "views": """
        SELECT viewname, definition FROM pg_views WHERE schemaname = 'public'
        UNION ALL
        SELECT matviewname, definition FROM pg_matviews WHERE schemaname = 'public'""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND NOT t.tgisinternal""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.prokind IN ('f', 'p')""",
    "sequences": """
        SELECT sequence_name, data_type FROM information_schema.sequences
        WHERE sequence_schema = 'public'""",
    "types": """
        SELECT t.typname, string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE n.nspname = 'public' GROUP BY t.typname""",
}


def _pg(conn: sa.Connection) -> dict[str, set[tuple]]:
    return {kind: {tuple(row) for row in conn.exec_driver_sql(sql)}
            for kind, sql in PG_QUERIES.items()}


def _sql(text: str | None) -> str:
    """SQLite keeps the CREATE statement as written: fold white space and quotes."""
    return re.sub(r"\s+", " ", (text or "").replace('"', "")).strip()


def _clauses(create_table: str | None) -> tuple[str, ...]:
    """A CREATE TABLE's column and constraint clauses, sorted, in the form
    that means something to SQLite. A batch re-creation (Alembic copies the
    table) may list the same CHECK constraints in another order, write
    ``DEFAULT (x)`` for ``DEFAULT x`` and drop the PRIMARY KEY's name, which
    SQLite neither reports nor lets anything refer to. Column order is
    compared through PRAGMA table_info."""
    text = re.sub(r"DEFAULT \(([^()]*)\)", r"DEFAULT \1", _sql(create_table))
    text = re.sub(r"CONSTRAINT \w+ PRIMARY KEY", "PRIMARY KEY", text)
    body = text.partition("(")[2].rpartition(")")[0]
    parts, depth, cur = [], 0, ""
    for ch in body:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return tuple(sorted(parts + [cur.strip()]))


def _sqlite(conn: sa.Connection) -> dict[str, set[tuple]]:
    master = conn.exec_driver_sql(
        "SELECT type, name, tbl_name, sql FROM sqlite_master "
        "WHERE name NOT LIKE 'sqlite_%'").all()
    tables = [name for kind, name, _, _ in master if kind == "table"]
    snap: dict[str, set[tuple]] = {
        "tables": {(name,) for name in tables},
        # the whole statement: CHECK and UNIQUE constraints live only there
        "table_sql": {(name, _clauses(sql)) for kind, name, _, sql in master
                      if kind == "table"},
        "views": {(name, _sql(sql)) for kind, name, _, sql in master if kind == "view"},
        "triggers": {(tbl, name, _sql(sql)) for kind, name, tbl, sql in master
                     if kind == "trigger"},
        # named indexes and the automatic ones behind UNIQUE / PRIMARY KEY
        "indexes": {(tbl, name, _sql(sql)) for kind, name, tbl, sql in master
                    if kind == "index"},
        "columns": set(), "index_columns": set(), "foreign_keys": set(),
    }
    for table in tables:
        q = table.replace('"', '""')
        for cid, name, type_, notnull, default, pk in conn.exec_driver_sql(
                f'PRAGMA table_info("{q}")'):
            snap["columns"].add((table, cid, name, type_.upper(), notnull, default, pk))
        for _, name, unique, origin, partial in conn.exec_driver_sql(
                f'PRAGMA index_list("{q}")'):
            iq = name.replace('"', '""')
            cols = tuple(r[2] for r in conn.exec_driver_sql(f'PRAGMA index_info("{iq}")'))
            snap["index_columns"].add((table, name, unique, origin, partial, cols))
        for fk in conn.exec_driver_sql(f'PRAGMA foreign_key_list("{q}")'):
            snap["foreign_keys"].add((table, *tuple(fk)[2:]))
    return snap


def schema_snapshot(url: str) -> dict[str, set[tuple]]:
    """Everything the migrations define, as sets of rows per kind of object."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return _pg(conn) if engine.dialect.name == "postgresql" else _sqlite(conn)
    finally:
        engine.dispose()


def schema_diff(before: dict[str, set[tuple]], after: dict[str, set[tuple]]) -> list[str]:
    """Human-readable differences, empty when the two snapshots are the same."""
    out = []
    for kind in sorted(before.keys() | after.keys()):
        b, a = before.get(kind, set()), after.get(kind, set())
        out += [f"{kind} gone: {row}" for row in sorted(b - a, key=repr)]
        out += [f"{kind} new: {row}" for row in sorted(a - b, key=repr)]
    return out
