"""A background thread with a stop flag: the daemon's helpers share this shape."""

from __future__ import annotations

import threading


class Worker:
    """Subclasses set ``thread_name`` and write ``_run``, which should return
    soon after ``self._stop`` is set (wait on it rather than sleep)."""

    thread_name = "lastlogin-worker"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        raise NotImplementedError
