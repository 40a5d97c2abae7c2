"""Pool the per-round figures of run1.out..run3.out: per (variant, size), median [min-max] over the
15 rounds of CPU per login and of the per-round ratio to V0 (same run, same round, same size)."""
import re
import statistics
import sys

pat = re.compile(r"^round (\d+) (\w+) b(\d+)\s+backend CPU ([\d.]+) ms/login")
cpu = {}
for f in sys.argv[1:]:
    for line in open(f):
        m = pat.match(line)
        if m:
            rd, k, s, c = m.groups()
            cpu[(f, int(rd), k, int(s))] = float(c) * 1e3
keys = sorted({(k, s) for (_, _, k, s) in cpu}, key=lambda x: (-x[1], x[0]))
print(f"pooled over {sys.argv[1:]}: {len({(f, r) for (f, r, _, _) in cpu})} rounds")
print(f"{'size':5} {'var':4} {'CPU us/login median [min-max]':32} {'ratio to V0 median [min-max]':30} saved us/login")
for k, s in keys:
    rounds = [(f, r) for (f, r, kk, ss) in cpu if kk == k and ss == s]
    c = [cpu[(f, r, k, s)] for f, r in rounds]
    rt = [cpu[(f, r, k, s)] / cpu[(f, r, "V0", s)] for f, r in rounds]
    sv = [cpu[(f, r, "V0", s)] - cpu[(f, r, k, s)] for f, r in rounds]
    print(f"b{s:<4} {k:4} {statistics.median(c):7.2f} [{min(c):6.2f}-{max(c):6.2f}]          "
          f"{statistics.median(rt):.3f} [{min(rt):.3f}-{max(rt):.3f}]           {statistics.median(sv):6.2f}")
