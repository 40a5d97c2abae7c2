"""A bounded stream of post-login requests, counting what was acknowledged."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from tests.builders import request_bytes
from tests.harness.postlogin import send_request


@dataclass
class Stream:
    path_of: object                 # callable: () -> socket path (may change)
    prefix: str = "s"
    interval: float = 0.01
    acked: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline and not self._stop.is_set():
            name = f"{self.prefix}{i}@example.com"
            started = time.monotonic()
            try:
                ex = send_request(self.path_of(), request_bytes(name.encode()), timeout=30)
                ok = not ex.refused
                ex.client.close()
            except OSError:
                ok = False
            self.latencies.append(time.monotonic() - started)
            (self.acked if ok else self.refused).append(name)
            i += 1
            time.sleep(self.interval)

    def start(self, seconds: float) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(seconds,), daemon=True)
        t.start()
        return t
