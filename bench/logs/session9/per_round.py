"""Per-round figures of bench.dovecot_modes logs: for each round, protocol and mode, p50 at c=1
minus the floor mode's p50 in that round, and the rate at c=16 over the floor's in that round;
medians over the rounds with their range.

    python bench/logs/session9/per_round.py bench/logs/session9/dovecot-modes*.log
"""
import re
import statistics as st
import sys

for f in sys.argv[1:]:
    d = {}
    for ln in open(f):
        m = re.match(r"round (\d+) (\S+)\s+(imap|pop3) c=(\d+)\s+(\d+)/s p50\s+([\d.]+) ms", ln)
        if m:
            r, mode, p, c, rate, p50 = m.groups()
            d[(int(r), mode, p, int(c))] = (float(rate), float(p50))
    rounds = sorted({k[0] for k in d})
    print(f)
    for p in ("imap", "pop3"):
        for mode in sorted({k[1] for k in d} - {"floor"}):
            diffs = [d[(r, mode, p, 1)][1] - d[(r, "floor", p, 1)][1] for r in rounds]
            ratios = [d[(r, mode, p, 16)][0] / d[(r, "floor", p, 16)][0] for r in rounds]
            print(f"  {p} {mode:14} c=1 p50 - floor: median {st.median(diffs):+.2f} ms "
                  f"({min(diffs):+.2f}..{max(diffs):+.2f}); c=16 / floor: median "
                  f"{st.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})")

# Pooled: every round of every log given, per mode and protocol (median, quartiles).
pool: dict = {}
for f in sys.argv[1:]:
    d = {}
    for ln in open(f):
        m = re.match(r"round (\d+) (\S+)\s+(imap|pop3) c=(\d+)\s+(\d+)/s p50\s+([\d.]+) ms", ln)
        if m:
            r, mode, p, c, rate, p50 = m.groups()
            d[(int(r), mode, p, int(c))] = (float(rate), float(p50))
    for (r, mode, p, c), (rate, p50) in d.items():
        if mode != "floor":
            floor = d[(r, "floor", p, c)]
            pool.setdefault((mode, p, c), []).append(p50 - floor[1] if c == 1 else rate / floor[0])
print("pooled over all rounds of the logs given")
for (mode, p, c), v in sorted(pool.items()):
    q = st.quantiles(v, n=4)
    what = "c=1 p50 - floor (ms)" if c == 1 else "c=16 / floor"
    print(f"  {p} {mode:14} {what}: {len(v)} rounds, median {st.median(v):+.2f}, "
          f"quartiles {q[0]:+.2f}..{q[2]:+.2f}")
