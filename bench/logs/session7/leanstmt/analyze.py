"""Attribution from a bench output: per round, differences of backend CPU per commit (schedstat)
between variants of the same round, median over the rounds, and as a share of L0.
Usage: analyze.py bench.out [more.out ...]"""
import re
import statistics
import sys

for path in sys.argv[1:]:
    rounds = {}
    for line in open(path):
        m = re.match(r"round (\d+) (\S+)\s+p50 ([\d.]+) ms\s+backend CPU ([\d.]+) ms", line)
        if m:
            rounds.setdefault(int(m.group(1)), {})[m.group(2)] = float(m.group(4))
    rs = list(rounds.values())

    def med(f):
        return statistics.median(f(r) for r in rs)

    print(f"== {path}: {len(rs)} rounds; ms of backend CPU per commit, median over rounds of the "
          "per-round value; share = per-round value / L0 of that round, median")
    have = set.intersection(*(set(r) for r in rs))
    parts = [
        ("L0 total", lambda r: r["L0"]),
        ("floor: protocol+bind+trivial 1-row INSERT+commit/WAL flush (A_floor)", lambda r: r["A_floor"]),
        ("login_events INSERT beyond the floor (A_events - A_floor)", lambda r: r["A_events"] - r["A_floor"]),
        ("  of it: tuple routing (A_events - A_events_part)", lambda r: r["A_events"] - r["A_events_part"]),
        ("  of it: the 7 secondary indexes (A_events - A_events@pkonly)", lambda r: r["A_events"] - r["A_events@pkonly"]),
        ("  of it: the rest (wide row, PK + conflict check, ...)", lambda r: r["A_events@pkonly"] - r["A_floor"] - (r["A_events"] - r["A_events_part"])),
        ("last_logins upsert beyond the floor (A_last - A_floor)", lambda r: r["A_last"] - r["A_floor"]),
        ("both in one statement, CTE glue (L2 - A_events - A_last + A_floor)", lambda r: r["L2"] - r["A_events"] - r["A_last"] + r["A_floor"]),
        ("L0's extra over L2 (input/located CTE, GROUP BY + 5 array_agg, delivered, InitPlans, 2 array params)", lambda r: r["L0"] - r["L2"]),
        ("  of it: input CTE kept (L1i - L1)", lambda r: r["L1i"] - r["L1"]),
        ("  of it: values via RETURNING instead of params (L1 - L2)", lambda r: r["L1"] - r["L2"]),
    ]
    parts.append(("L2 - L4 (final SELECT, RETURNING, count InitPlans)", lambda r: r["L2"] - r["L4"]))
    parts.append(("L0 - M_noagg (GROUP BY + 5 array_agg, 4 of them ORDER BY)", lambda r: r["L0"] - r["M_noagg"]))
    parts.append(("L0 - M_nodeliv (delivered CTE: unnest of 2 empty arrays, hash join, sort, insert node)",
                  lambda r: r["L0"] - r["M_nodeliv"]))
    parts.append(("L4 - L5 (ON CONFLICT target: pg_inherits scan per partition index per execution)",
                  lambda r: r["L4"] - r["L5"]))
    parts.append(("L4 - L4@nocheck (3 CHECK constraints re-read from the catalog text per execution)",
                  lambda r: r["L4"] - r["L4@nocheck"]))
    parts.append(("L4 - L4@pkonly (the 7 secondary indexes of login_events, with their ancestor scans)",
                  lambda r: r["L4"] - r["L4@pkonly"]))
    parts.append(("L5 - L5@pkonly (the 7 secondary indexes, without the ancestor scans)",
                  lambda r: r["L5"] - r["L5@pkonly"]))
    for name, f in parts:
        try:
            print(f"  {med(f):7.4f} ms  {med(lambda r: f(r) / r['L0']) * 100:5.1f} %  {name}")
        except KeyError:
            pass
    print()
