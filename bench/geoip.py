"""What GeoIP costs a login: the decision step with and without both databases.

    python -m bench.geoip [--smoke]

Same run, same process, same requests: ``service.explain`` alone (what every
login runs today) against ``service.locate`` + ``service.explain`` with a
country and an ASN database (built here with mmdb-writer, the test
databases: a real GeoLite2 file has a deeper tree, a few more node reads).
Addresses cycle through located and unknown ones, IPv4 and IPv6. Writes its
table into docs/performance.md.
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import tempfile
import time

from app.geoip import GeoIP
from app.protocol import LoginRequest
from app.service import explain, locate
from tests.harness import geoipdb

from .doc import write_section

ADDRS = [geoipdb.DE, geoipdb.AT, geoipdb.FR, geoipdb.ASN_ONLY, geoipdb.DE6, geoipdb.JP6,
         geoipdb.UNKNOWN, "10.20.30.40"]


def run(n: int, geoip: GeoIP | None) -> float:
    """Seconds per login for n decisions."""
    now = dt.datetime.now(dt.timezone.utc)
    reqs = [LoginRequest(b"192.0.2.25", a.encode(), b"alice@example.org", [b"uid=5000"])
            for a in ADDRS]
    started = time.perf_counter()
    for i in range(n):
        req = reqs[i % len(reqs)]
        explain(None, "imap", req, now, place=locate(geoip, req.remote_ip))
    return (time.perf_counter() - started) / n


def main() -> None:
    smoke = "--smoke" in sys.argv[1:]
    n, rounds = (2000, 3) if smoke else (50000, 7)
    with tempfile.TemporaryDirectory() as tmp:
        geoip = GeoIP(*geoipdb.build(tmp))
        base, geo = [], []
        for _ in range(rounds):                 # interleaved: load drift hits both
            base.append(run(n, None))
            geo.append(run(n, geoip))
    b, g = statistics.median(base), statistics.median(geo)
    lines = [
        f"{n:,} decisions x {rounds} rounds (interleaved), median per login:",
        "",
        "| decision step | µs per login |",
        "|---|---|",
        f"| no GeoIP (`explain`) | {b * 1e6:.2f} |",
        f"| country + ASN databases (`locate` + `explain`) | {g * 1e6:.2f} |",
        f"| added by the two lookups | {(g - b) * 1e6:.2f} ({g / b:.2f}x the step) |",
        "",
        "Measured on a shared 2-core box; compare the added µs with a whole login "
        "through Dovecot (milliseconds, the tables above), not with the bare step.",
    ]
    if smoke:
        print("\n".join(lines))
        print("geoip benchmark ran")
        return
    write_section("geoip", "GeoIP lookups per login", lines)


if __name__ == "__main__":
    main()
