"""Per-round ratios of the per-commit CPU MEDIANS (p50) from pg_bench.py outputs (the 'round' lines)."""
import re, statistics, sys
for f in sys.argv[1:]:
    d = {}
    for line in open(f):
        m = re.match(r"round (\d) (\w) (\w+)\s+backend CPU mean ([\d.]+) ms/commit \(p50 ([\d.]+)\)", line)
        if m:
            d.setdefault((m[2], m[3]), []).append((float(m[4]), float(m[5])))
    for k in "abc":
        per = 64 if k == "c" else 1
        w, wo = d[(k, "with")], d[(k, "without")]
        r = [y[1] / x[1] for x, y in zip(w, wo)]
        dd = [(x[1] - y[1]) * 1e3 / per for x, y in zip(w, wo)]
        print(f"{f} {k}: CPU p50 with {statistics.median(x[1] for x in w):.4f} without {statistics.median(x[1] for x in wo):.4f} ms; "
              f"ratio w/o/with {statistics.median(r):.3f} ({min(r):.3f}..{max(r):.3f}); diff {statistics.median(dd):.2f} us/login "
              f"({min(dd):.2f}..{max(dd):.2f}); per round " + " ".join(f"{x:.3f}" for x in r))
