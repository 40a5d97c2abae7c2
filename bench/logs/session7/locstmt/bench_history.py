"""record() and history() of bench.py, copied for explain.py."""
import datetime as dt
import random
import sys

sys.path.insert(0, "/work/notes/locstmt")
from lib import T0, located_record, unlocated_record  # noqa: E402


def record(rnd, kind, when, i):
    if kind == "unloc":
        return unlocated_record(rnd, when, i)
    if kind == "denied":
        return unlocated_record(rnd, when, i, "denied")
    return located_record(rnd, when, kind, i)


def history(seed, n, spread):
    """n earlier logins: 50 % with a country (and maybe an ASN), 20 % ASN only, 30 % unlocated;
    in the last 3000*10 ms before T0, or (spread) over the 12 months before T0's and T0's month."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if spread:
            when = T0 - dt.timedelta(days=390) + dt.timedelta(seconds=390 * 86400 * i / n)
        else:
            when = T0 - dt.timedelta(milliseconds=10 * (n - i))
        kind = rnd.choices(["country", "asn", "unloc"], [5, 2, 3])[0]
        out.append(record(rnd, kind, when, -i))
    return out


