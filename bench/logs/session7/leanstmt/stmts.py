"""Statement texts compared here (research only; nothing here is used by the app).

L0  app.db.writers.PG_ONE_UNLOCATED as it is (baseline).
L1  one-row INSERT ... VALUES into login_events (no input/located CTE), RETURNING what the fold
    needs; fold = plain one-row upsert FROM new WHERE outcome = 'allowed' (no GROUP BY/array_agg);
    no delivered CTE; SELECT count(new), count(folded), 0, NULL::uuid[].
L1i L1 with L0's input CTE kept (INSERT ... SELECT FROM input) -- to see what the CTE itself costs.
L2  L1 with the values passed once: new RETURNING 1 only; the fold reads the parameters
    (still FROM new, so only when the INSERT added the row); the outcome test is on the parameter.
L4  L2 without the final SELECT: the upsert is the statement and the events INSERT its CTE; the
    writer reads the command tag's count (1: inserted and folded, 0: a replay). L4d: a record that
    is not allowed: the plain INSERT ... ON CONFLICT DO NOTHING, count = inserted.
L5  L4 (L5d: L4d) with ON CONFLICT DO NOTHING without the (event_id, occurred_at) target.
M_nodeliv / M_noagg  L0 without the delivered CTE / with L1's fold instead of GROUP BY + array_agg.
L3  L2 for a record that is not 'allowed': only the INSERT (no fold at all; the writer would pick
    it by outcome, as it picks PG_ONE_UNLOCATED by ``unlocated``).
A_* attribution only (not equivalent): one part of the work as a statement of its own.
All in the writer's form: %(name)s placeholders, turned into $n by app.db.writers._positional.
"""
import sys

sys.path.insert(0, "/work/main")
from app.db.writers import COLUMNS, PG_ONE_UNLOCATED  # noqa: E402

CASTS = dict(event_id="uuid", occurred_at="timestamptz", username="text", username_raw="bytea",
             protocol="text", remote_ip="inet", local_ip="inet", outcome="text", rule_id="int",
             auth_mech="text", master_user="text", auth_user="text", message="text",
             policy_applied="bool", host="text", country="text", asn="bigint", session_id="text")
assert tuple(CASTS) == COLUMNS


def p(name):
    return f"%({name})s::{CASTS[name]}"


EV_COLS = ", ".join(COLUMNS) + ", new_location"
EV_VALUES = ", ".join(p(c) for c in COLUMNS) + ", false"
INPUT = "WITH input AS (SELECT " + ", ".join(f"{p(c)} AS {c}" for c in COLUMNS) + ")"
assert PG_ONE_UNLOCATED.startswith(INPUT + ", ")   # same input CTE text as L0

LAST_COLS = ("username, protocol, username_raw, first_seen, last_seen, last_remote_ip, "
             "last_local_ip, last_host, last_country, login_count")
# the DO UPDATE rules, character for character as PG_BATCH has them
_i = PG_ONE_UNLOCATED.index("ON CONFLICT (username, protocol) DO UPDATE SET ")
_j = PG_ONE_UNLOCATED.index(" RETURNING 1 ), delivered AS")
UPSERT = PG_ONE_UNLOCATED[_i:_j]
assert UPSERT.endswith("login_count = l.login_count + EXCLUDED.login_count")

EV_CONFLICT = "ON CONFLICT (event_id, occurred_at) DO NOTHING"
FOLD_RET = "username, protocol, username_raw, occurred_at, remote_ip, local_ip, host, country, outcome"
FINAL = "SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM folded), 0::bigint, NULL::uuid[]"

S = {"L0": PG_ONE_UNLOCATED}

S["L1"] = (
    f"WITH new AS ( INSERT INTO login_events ({EV_COLS}) VALUES ({EV_VALUES}) {EV_CONFLICT} "
    f"RETURNING {FOLD_RET} ), "
    f"folded AS ( INSERT INTO last_logins AS l ({LAST_COLS}) "
    "SELECT username, protocol, username_raw, occurred_at, occurred_at, remote_ip, local_ip, host, "
    "country, 1::bigint FROM new WHERE outcome = 'allowed' "
    f"{UPSERT} RETURNING 1 ) {FINAL}")

S["L1i"] = (
    f"{INPUT}, new AS ( INSERT INTO login_events ({EV_COLS}) SELECT *, false FROM input {EV_CONFLICT} "
    f"RETURNING {FOLD_RET} ), "
    f"folded AS ( INSERT INTO last_logins AS l ({LAST_COLS}) "
    "SELECT username, protocol, username_raw, occurred_at, occurred_at, remote_ip, local_ip, host, "
    "country, 1::bigint FROM new WHERE outcome = 'allowed' "
    f"{UPSERT} RETURNING 1 ) {FINAL}")

S["L2"] = (
    f"WITH new AS ( INSERT INTO login_events ({EV_COLS}) VALUES ({EV_VALUES}) {EV_CONFLICT} "
    "RETURNING 1 ), "
    f"folded AS ( INSERT INTO last_logins AS l ({LAST_COLS}) "
    f"SELECT {p('username')}, {p('protocol')}, {p('username_raw')}, {p('occurred_at')}, "
    f"{p('occurred_at')}, {p('remote_ip')}, {p('local_ip')}, {p('host')}, {p('country')}, 1::bigint "
    f"FROM new WHERE {p('outcome')} = 'allowed' "
    f"{UPSERT} RETURNING 1 ) {FINAL}")

S["L3"] = (
    f"WITH new AS ( INSERT INTO login_events ({EV_COLS}) VALUES ({EV_VALUES}) {EV_CONFLICT} "
    "RETURNING 1 ) SELECT (SELECT count(*) FROM new), 0::bigint, 0::bigint, NULL::uuid[]")

# L4: the writer reads the command tag's row count instead of a row (pgresult.command_tuples).
# allowed record: the fold is the statement, the events INSERT its CTE; count 1 = inserted and folded
# (DO UPDATE without WHERE always affects the row), 0 = stored already.
S["L4"] = (
    f"WITH new AS ( INSERT INTO login_events ({EV_COLS}) VALUES ({EV_VALUES}) {EV_CONFLICT} "
    "RETURNING 1 ) "
    f"INSERT INTO last_logins AS l ({LAST_COLS}) "
    f"SELECT {p('username')}, {p('protocol')}, {p('username_raw')}, {p('occurred_at')}, "
    f"{p('occurred_at')}, {p('remote_ip')}, {p('local_ip')}, {p('host')}, {p('country')}, 1::bigint "
    f"FROM new WHERE {p('outcome')} = 'allowed' {UPSERT}")
# L4d: a record that is not allowed: the events INSERT alone; count = inserted
S["L4d"] = f"INSERT INTO login_events ({EV_COLS}) VALUES ({EV_VALUES}) {EV_CONFLICT}"

# L5 / L5d: L4 / L4d with the events' ON CONFLICT without a conflict target. With a target, PG 15's
# tuple routing maps the arbiter index to the partition's by a pg_inherits scan per index of the
# partition (get_partition_ancestors), at every execution. Same effect only while the primary key
# is login_events' one unique index (DO NOTHING without a target also swallows conflicts on any
# other unique index); NOT what the brief asked to keep -- measured as an option.
S["L5"] = S["L4"].replace(EV_CONFLICT, "ON CONFLICT DO NOTHING")
S["L5d"] = S["L4d"].replace(EV_CONFLICT, "ON CONFLICT DO NOTHING")
assert EV_CONFLICT not in S["L5"] + S["L5d"]

# M_*: L0 with one of its parts taken out, to split L0 - L2 (equivalent for a record without alerts)
_d0 = S["L0"].index(", delivered AS (")
_d1 = S["L0"].index(" SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM folded)")
S["M_nodeliv"] = (S["L0"][:_d0] + S["L0"][_d1:]).replace("(SELECT count(*) FROM delivered)", "0::bigint")
_f0 = S["L0"].index("SELECT username, protocol, (array_agg(username_raw))[1]")
_f1 = S["L0"].index("GROUP BY username, protocol ORDER BY username, protocol") + len(
    "GROUP BY username, protocol ORDER BY username, protocol")
S["M_noagg"] = (S["L0"][:_f0] + "SELECT username, protocol, username_raw, occurred_at, occurred_at, "
                "remote_ip, local_ip, host, country, 1::bigint FROM new WHERE outcome = 'allowed'"
                + S["L0"][_f1:])
assert "delivered" not in S["M_nodeliv"] and "array_agg(username_raw)" not in S["M_noagg"]

# X_nogate: a negative control for equiv.py (NOT equivalent): L2 with the fold not gated by `new`,
# so a replayed record is counted again; the check must tell it from L0.
S["X_nogate"] = S["L2"].replace("FROM new WHERE", "FROM (SELECT 1) AS one WHERE")
assert S["X_nogate"] != S["L2"]

# --- attribution (NOT equivalent) ---
A = {
    # the login_events insert alone, as a plain statement (no CTE, no RETURNING)
    "A_events": f"INSERT INTO login_events ({EV_COLS}) VALUES ({EV_VALUES}) {EV_CONFLICT}",
    # ... straight into the month's partition: no tuple routing
    "A_events_part": (f"INSERT INTO login_events_p202611 ({EV_COLS}) VALUES ({EV_VALUES}) "
                      f"{EV_CONFLICT}"),
    # the last_logins upsert alone, as L2 does it
    "A_last": (f"INSERT INTO last_logins AS l ({LAST_COLS}) VALUES ({p('username')}, {p('protocol')}, "
               f"{p('username_raw')}, {p('occurred_at')}, {p('occurred_at')}, {p('remote_ip')}, "
               f"{p('local_ip')}, {p('host')}, {p('country')}, 1::bigint) {UPSERT}"),
    # a floor: one row into an unindexed one-column table, committed (WAL flush, protocol, executor)
    "A_floor": "INSERT INTO floor_t VALUES (%(asn)s::bigint)",
}

if __name__ == "__main__":
    for k, v in {**S, **A}.items():
        print(f"== {k} ({len(v)} chars)\n{v}\n")
