"""Text variants of app.db.writers.PG_ONE (research only; nothing here is used by the app).

A_* : one part removed, to attribute cost (NOT equivalent, not proposals).
E_* : meant to store the same rows for a batch of ONE login (checked by equiv.py).
"""
import datetime as dt
import random
import re
import sys
import uuid

sys.path.insert(0, "/work/main")
from app.db.writers import PG_ONE  # noqa: E402
from app.login import LoginRecord  # noqa: E402


def _sub(pat, rep, s, count=1):
    out, n = re.subn(pat, rep, s, count=count)
    assert n == count or (count == 0 and n > 0), (pat, n)
    return out


LOCATED = re.compile(r"located AS \( SELECT i\.\*, CASE .*? END AS new_location FROM input i \)")
FOLDED = re.compile(r"folded AS \( .*? RETURNING 1 \), ")
DELIVERED = re.compile(r", delivered AS \( .*? RETURNING 1 \)")
FINAL = re.compile(r" SELECT \(SELECT count\(\*\) FROM new\), \(SELECT count\(\*\) FROM folded\), "
                   r"\(SELECT count\(\*\) FROM delivered\), "
                   r"\(SELECT array_agg\(event_id\) FROM new WHERE new_location\)$")
INPUT_PROBE = re.compile(r" (?:OR|AND NOT) EXISTS \(SELECT 1 FROM input b WHERE [^)]*\)")
FOLD_SELECT = re.compile(r"SELECT username, protocol, \(array_agg\(username_raw\)\)\[1\].*?"
                         r"GROUP BY username, protocol ORDER BY username, protocol")

assert LOCATED.search(PG_ONE) and FOLDED.search(PG_ONE) and DELIVERED.search(PG_ONE)
assert FINAL.search(PG_ONE) and len(INPUT_PROBE.findall(PG_ONE)) == 3 and FOLD_SELECT.search(PG_ONE)

V = {"base": PG_ONE}
# --- attribution (not equivalent) ---
V["A_noprobes"] = LOCATED.sub("located AS ( SELECT i.*, false AS new_location FROM input i )", PG_ONE)
V["A_nofold"] = FINAL.sub(" SELECT (SELECT count(*) FROM new), 0::bigint, (SELECT count(*) FROM delivered), "
                          "(SELECT array_agg(event_id) FROM new WHERE new_location)",
                          FOLDED.sub("", PG_ONE))
V["A_nodeliv"] = FINAL.sub(" SELECT (SELECT count(*) FROM new), (SELECT count(*) FROM folded), 0::bigint, "
                           "(SELECT array_agg(event_id) FROM new WHERE new_location)",
                           DELIVERED.sub("", PG_ONE))
# only the events insert (with probes): what is left when fold and deliveries are gone
V["A_eventsonly"] = FINAL.sub(" SELECT (SELECT count(*) FROM new), 0::bigint, 0::bigint, "
                              "(SELECT array_agg(event_id) FROM new WHERE new_location)",
                              DELIVERED.sub("", FOLDED.sub("", PG_ONE)))

# --- equivalent for one row ---
# 1. the probes of `input b` can never match with one row (b is i, and b.occurred_at < i.occurred_at is false)
noinput = INPUT_PROBE.sub("", PG_ONE)
noinput = noinput.replace("WHEN NOT (EXISTS (SELECT 1 FROM login_events p WHERE p.username = i.username "
                          "AND p.outcome = 'allowed' AND p.occurred_at < i.occurred_at)) THEN false",
                          "WHEN NOT EXISTS (SELECT 1 FROM login_events p WHERE p.username = i.username "
                          "AND p.outcome = 'allowed' AND p.occurred_at < i.occurred_at) THEN false")
V["E_noinputprobes"] = noinput
# 2. ... and the probes compare with the statement's parameters (external params: the generic plan
#    can prune partitions at executor start-up instead of per probe)
params = (noinput.replace("i.occurred_at)", "%(occurred_at)s::timestamptz)")
          .replace("p.username = i.username", "p.username = %(username)s::text")
          .replace("p.country = i.country", "p.country = %(country)s::text")
          .replace("p.asn = i.asn", "p.asn = %(asn)s::bigint"))
assert "p.occurred_at < i." not in params
V["E_paramprobes"] = params
# 3. the fold of one row without aggregation (same values: array_agg(x)[1], min, max of one row; count 1)
FOLD1 = ("SELECT username, protocol, username_raw, occurred_at, occurred_at, remote_ip, local_ip, host, "
         "country, 1::bigint FROM new WHERE outcome = 'allowed'")
V["E_fold1"] = FOLD_SELECT.sub(FOLD1, PG_ONE)
# 4. final SELECT: only what the writer reads (row[0], row[3]); fold and deliveries run to completion
#    anyway (data-modifying CTEs always do), without RETURNING
fin = FINAL.sub(" SELECT (SELECT count(*) FROM new), 0::bigint, 0::bigint, "
                "(SELECT array_agg(event_id) FROM new WHERE new_location)", PG_ONE)
fin = fin.replace("login_count = l.login_count + EXCLUDED.login_count RETURNING 1 )",
                  "login_count = l.login_count + EXCLUDED.login_count )")
fin = fin.replace("ON CONFLICT DO NOTHING RETURNING 1 )", "ON CONFLICT DO NOTHING )")
assert fin.count("RETURNING 1") == 0
V["E_final2"] = fin


def lean(s):
    s = INPUT_PROBE.sub("", s)
    s = s.replace("WHEN NOT (EXISTS (SELECT 1 FROM login_events p WHERE p.username = i.username "
                  "AND p.outcome = 'allowed' AND p.occurred_at < i.occurred_at)) THEN false",
                  "WHEN NOT EXISTS (SELECT 1 FROM login_events p WHERE p.username = i.username "
                  "AND p.outcome = 'allowed' AND p.occurred_at < i.occurred_at) THEN false")
    s = (s.replace("i.occurred_at)", "%(occurred_at)s::timestamptz)")
         .replace("p.username = i.username", "p.username = %(username)s::text")
         .replace("p.country = i.country", "p.country = %(country)s::text")
         .replace("p.asn = i.asn", "p.asn = %(asn)s::bigint"))
    s = FOLD_SELECT.sub(FOLD1, s)
    s = FINAL.sub(" SELECT (SELECT count(*) FROM new), 0::bigint, 0::bigint, "
                  "(SELECT array_agg(event_id) FROM new WHERE new_location)", s)
    s = s.replace("login_count = l.login_count + EXCLUDED.login_count RETURNING 1 )",
                  "login_count = l.login_count + EXCLUDED.login_count )")
    s = s.replace("ON CONFLICT DO NOTHING RETURNING 1 )", "ON CONFLICT DO NOTHING )")
    return s


V["E_lean"] = lean(PG_ONE)

T0 = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.timezone.utc)
USERS = [f"u{i}@example.com".encode() for i in range(64)]


def make_records(n, start, seed, alerts=False, denied=False):
    """n records, 64 users, times start, start+10ms, ...; about 1/3 without country/asn."""
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        i = start + k
        place = rnd.choice([("DE", 3320), ("DE", 3320), ("FR", 12322), (None, 3320), (None, None),
                            (None, None), ("US", None)])
        out.append(LoginRecord(
            event_id=uuid.UUID(int=rnd.getrandbits(128), version=4),
            occurred_at=T0 + dt.timedelta(milliseconds=10 * i),
            username=USERS[rnd.randrange(64)], protocol=rnd.choice(["imap", "imap", "pop3"]),
            remote_ip="198.51.100.7", local_ip="192.0.2.25",
            outcome="denied" if denied and rnd.random() < 0.2 else "allowed",
            auth_mech=b"PLAIN", host="mx1", country=place[0], asn=place[1],
            alerts_shown=tuple(rnd.sample([1, 2, 3], rnd.randrange(3))) if alerts else ()))
    return out


if __name__ == "__main__":
    for k, v in V.items():
        print(f"== {k} ({len(v)} chars)\n{v}\n")


# --- E_split: the writer picks one of three statements by the record (the CASE's own branches) ---
_P1 = ("EXISTS (SELECT 1 FROM login_events p WHERE p.username = %(username)s::text AND p.outcome = 'allowed' "
       "AND p.occurred_at < %(occurred_at)s::timestamptz)")
_PC = ("EXISTS (SELECT 1 FROM login_events p WHERE p.username = %(username)s::text AND p.country = "
       "%(country)s::text AND p.outcome = 'allowed' AND p.occurred_at < %(occurred_at)s::timestamptz)")
_PA = ("EXISTS (SELECT 1 FROM login_events p WHERE p.username = %(username)s::text AND p.asn = "
       "%(asn)s::bigint AND p.outcome = 'allowed' AND p.occurred_at < %(occurred_at)s::timestamptz)")
_LEAN_LOCATED = re.compile(r"located AS \( SELECT i\.\*, CASE .*? END AS new_location FROM input i \)")
assert _LEAN_LOCATED.search(V["E_lean"])
SPLIT = {
    "none": _LEAN_LOCATED.sub("located AS ( SELECT i.*, false AS new_location FROM input i )", V["E_lean"]),
    "country": _LEAN_LOCATED.sub(f"located AS ( SELECT i.*, CASE WHEN NOT {_P1} THEN false ELSE NOT {_PC} END "
                                 "AS new_location FROM input i )", V["E_lean"]),
    "asn": _LEAN_LOCATED.sub(f"located AS ( SELECT i.*, CASE WHEN NOT {_P1} THEN false ELSE NOT {_PA} END "
                             "AS new_location FROM input i )", V["E_lean"]),
}


def split_kind(rec):
    """Which of PG_ONE's CASE branches can apply (the CASE's own first test, in Python)."""
    if rec.outcome != "allowed" or (rec.country is None and rec.asn is None):
        return "none"
    return "country" if rec.country is not None else "asn"
