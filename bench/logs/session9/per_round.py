"""Per-round figures of bench.dovecot_modes logs: for each round, protocol and mode, p50 at c=1
minus the floor mode's p50 in that round, and the rate at c=16 over the floor's in that round;
medians over the rounds of each log with their range, then over the rounds of all logs given
(median and quartiles).

    python bench/logs/session9/per_round.py bench/logs/session9/dovecot-modes*.log
"""
import re
import statistics as st
import sys


def against_floor(path: str) -> dict[tuple[str, str, int], list[float]]:
    """(mode, protocol, concurrency) -> per round: p50 - floor's (c=1) or rate / floor's (c=16)."""
    d = {}
    for ln in open(path):
        m = re.match(r"round (\d+) (\S+)\s+(imap|pop3) c=(\d+)\s+(\d+)/s p50\s+([\d.]+) ms", ln)
        if m:
            r, mode, p, c, rate, p50 = m.groups()
            d[(int(r), mode, p, int(c))] = (float(rate), float(p50))
    out: dict[tuple[str, str, int], list[float]] = {}
    for (r, mode, p, c), (rate, p50) in sorted(d.items()):
        if mode != "floor":
            floor = d[(r, "floor", p, c)]
            out.setdefault((mode, p, c), []).append(p50 - floor[1] if c == 1 else rate / floor[0])
    return out


pool: dict[tuple[str, str, int], list[float]] = {}
for f in sys.argv[1:]:
    print(f)
    per = against_floor(f)
    for p in ("imap", "pop3"):
        for mode in sorted({k[0] for k in per}):
            diffs, ratios = per[(mode, p, 1)], per[(mode, p, 16)]
            print(f"  {p} {mode:14} c=1 p50 - floor: median {st.median(diffs):+.2f} ms "
                  f"({min(diffs):+.2f}..{max(diffs):+.2f}); c=16 / floor: median "
                  f"{st.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})")
    for k, v in per.items():
        pool.setdefault(k, []).extend(v)
print("pooled over all rounds of the logs given")
for (mode, p, c), v in sorted(pool.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
    q = st.quantiles(v, n=4)
    what = "c=1 p50 - floor (ms)" if c == 1 else "c=16 / floor"
    print(f"  {p} {mode:14} {what}: {len(v)} rounds, median {st.median(v):+.2f}, "
          f"quartiles {q[0]:+.2f}..{q[2]:+.2f}")
