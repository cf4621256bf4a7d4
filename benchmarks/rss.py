"""Peak anonymous memory of this process while a block runs (Linux /proc), for benchmarks.

``RssAnon`` leaves out file pages (reclaimable cache), which is what a streaming reader should
be judged on. Sampled every 10 ms by a background thread.
"""

from __future__ import annotations

import threading
import time


def rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """``with AnonPeak() as p: ...``; then ``p.start_kib`` and ``p.peak_kib``."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start_kib = self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, rss_anon_kib())
            time.sleep(self.interval)

    def __enter__(self) -> AnonPeak:
        self.start_kib = self.peak_kib = rss_anon_kib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, rss_anon_kib())
