"""What one full collection costs in a process that has imported the
daemon's modules (app.daemon and what it pulls in), before and after
gc.freeze(): the objects the collector walks, and the time, median of 20."""
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import app.daemon  # noqa: E402,F401
import app.cli  # noqa: E402,F401


def full() -> float:
    times = []
    for _ in range(20):
        t = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


print(f"tracked objects {len(gc.get_objects()):,}, full collection {full():.2f} ms")
gc.freeze()
print(f"after gc.freeze(): tracked {len(gc.get_objects()):,} "
      f"(frozen {gc.get_freeze_count():,}), full collection {full():.2f} ms")
