"""PG_BATCH and the lean-batch variants V1..V5 (+ VB, a trivial baseline), derived from
app.db.writers.PG_BATCH's text at /work/main HEAD by exact string surgery (each replacement
asserted to match exactly once)."""
import sys

sys.path.insert(0, "/work/main")
from app.db import writers as W  # noqa: E402

B = W.PG_BATCH


def sub1(text, old, new):
    assert text.count(old) == 1, (text.count(old), old[:80])
    return text.replace(old, new)


def between(text, start, end):
    """The substring from `start` (incl.) to the first `end` after it (incl.)."""
    i = text.index(start)
    assert text.count(start) == 1
    j = text.index(end, i) + len(end)
    return text[i:j]


# V1: the located CASE as `false` (what writers._unlocated_statement does for PG_ONE)
case = between(B, "CASE WHEN i.outcome <> 'allowed'", " END AS new_location")
case = case[:-len(" AS new_location")]
assert case.startswith(W._UNLOCATED_SQL.replace("WHEN", "CASE WHEN", 1))
assert case == W._NEW_LOCATION_OF_BATCH
V1 = sub1(B, case, "false")

# V2: V1 without delivered and placed; their counts 0
delivered = between(V1, ", delivered AS ( INSERT INTO login_alert_deliveries", "RETURNING 1 )")
placed = between(V1, ", placed AS ( INSERT INTO login_places", "WHERE EXCLUDED.first_seen < s.first_seen )")
V2 = sub1(sub1(V1, delivered, ""), placed, "")
V2 = sub1(V2, "(SELECT count(*) FROM delivered)", "0")
assert "delivered" not in V2 and "placed" not in V2 and "login_places" not in V2

# V3: V2 with a plain final SELECT (no array_agg of new_location)
final = between(V2, ") SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM folded), 0,",
                "WHERE new_location)")
assert V2.endswith(final)
V3 = sub1(V2, final, ") SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM folded)")

# V4: only the login_events insert (input -> INSERT ... ON CONFLICT DO NOTHING), no fold
inp = between(B, "WITH input AS (", "session_id) )")
ins = between(B, "INSERT INTO login_events (", "ON CONFLICT (event_id, occurred_at) DO NOTHING")
ins = sub1(ins, "SELECT * FROM located", "SELECT *, false FROM input")
V4 = f"{inp} {ins}"

# V5: V2 with the fold's SELECT as DISTINCT ON over `new` (latest row per (username, protocol)),
# min(occurred_at) and count(*) as window aggregates over the same partition, so it stays valid
# for batches in which a (username, protocol) appears more than once.
fold_select = between(V2, "SELECT username, protocol, (array_agg(username_raw))[1]",
                      'ORDER BY username COLLATE "C", protocol')
assert fold_select == W._FOLD_OF_BATCH
FOLD5 = ('SELECT DISTINCT ON (username COLLATE "C", protocol) username, protocol, username_raw, '
         "min(occurred_at) OVER w, occurred_at, remote_ip, local_ip, host, country, count(*) OVER w "
         "FROM new WHERE outcome = 'allowed' "
         'WINDOW w AS (PARTITION BY username COLLATE "C", protocol) '
         'ORDER BY username COLLATE "C", protocol, occurred_at DESC')
V5 = sub1(V2, fold_select, FOLD5)

# VB: the benchmark's trivial handler's statement, for scale (not a candidate): only the usernames
# into an unindexed one-column table.
VB = "INSERT INTO sink (username) SELECT * FROM unnest(%(username)s::text[])"

VARIANTS = {"V0": B, "V1": V1, "V2": V2, "V3": V3, "V4": V4, "V5": V5, "VB": VB}

# ---- extras beyond the brief (diagnostic, not candidates) ------------------------------------------
# V6: the combined lean batch: V3's plain final SELECT with V5's fold.
V6 = sub1(V3, fold_select, FOLD5)
# X1: V4's rows into ev_plain (CREATE TABLE ev_plain (LIKE login_events): same columns, not
#     partitioned, no indexes, no constraints), no ON CONFLICT.
# X2: V4's rows into ev_idx (LIKE login_events INCLUDING ALL: not partitioned, login_events' indexes
#     and primary key), with V4's ON CONFLICT.
X1 = sub1(sub1(V4, "INSERT INTO login_events (", "INSERT INTO ev_plain ("),
          " ON CONFLICT (event_id, occurred_at) DO NOTHING", "")
X2 = sub1(V4, "INSERT INTO login_events (", "INSERT INTO ev_idx (")
VARIANTS.update({"V6": V6, "X1": X1, "X2": X2})
EXTRA_DDL = ["CREATE TABLE sink (username text)",
             "CREATE TABLE ev_plain (LIKE login_events)",
             "CREATE TABLE ev_idx (LIKE login_events INCLUDING ALL)"]
NOT_COMPARED = {"VB", "X1", "X2"}     # write elsewhere than login_events/last_logins
