"""The load generator both benchmarks share: worker threads, each repeating
one attempt, counted and timed."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Run:
    mode: str
    concurrency: int
    proto: str = ""
    logins: int = 0
    failures: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0                # the server's CPU seconds over the run, where measured
    client_cpu: float = 0.0         # the load client's CPU seconds, where measured
    db_cpu: float | None = None     # the database server's CPU seconds, where measured
    machine_cpu: float = 0.0        # every process's CPU seconds (/proc/stat), where measured
    wall: float = 0.0               # wall seconds over which cpu, client_cpu, db_cpu were taken

    @property
    def cpu_per_login(self) -> float:
        """The server's CPU per login, in ms."""
        return self.cpu / self.logins * 1000 if self.logins else float("nan")

    @property
    def rate(self) -> float:
        return self.logins / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        """The p-th percentile latency, in ms."""
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else float("nan")

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")


def drive(attempt: Callable[[int, int], bool], run: Run, seconds: float | None = None,
          count: int | None = None) -> Run:
    """Run ``attempt(worker, i)`` from ``run.concurrency`` threads, for
    ``seconds`` or ``count`` attempts in all; an OSError counts as a failure."""
    lock = threading.Lock()
    start = threading.Barrier(run.concurrency + 1)
    per_thread = count // run.concurrency if count is not None else None
    deadline = [0.0]

    def worker(n: int) -> None:
        lat, ok, bad, i = [], 0, 0, 0
        start.wait()
        while time.monotonic() < deadline[0] and (per_thread is None or i < per_thread):
            t0 = time.perf_counter()
            try:
                good = attempt(n, i)
            except OSError:
                good = False
            if good:
                ok += 1
                lat.append(time.perf_counter() - t0)
            else:
                bad += 1
            i += 1
        with lock:
            run.logins += ok
            run.failures += bad
            run.latencies += lat

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(run.concurrency)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + (seconds if seconds is not None else 1e9)
    start.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    run.seconds = time.monotonic() - t0
    return run
