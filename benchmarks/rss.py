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


def rss_fields_kib(names: tuple[str, ...] = ("RssAnon", "RssFile", "VmRSS")) -> dict[str, int]:
    """Several ``/proc/self/status`` sizes at once (KiB); missing ones read 0."""
    got = dict.fromkeys(names, 0)
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in got:
                got[key] = int(line.split()[1])
    return got


class RssPeaks:
    """``with RssPeaks() as p: ...``; then ``p.peak_kib`` maps RssAnon, RssFile and VmRSS to the
    largest value sampled (every 10 ms). File pages (RssFile: mapped model files, libraries)
    are reclaimable; anonymous ones (RssAnon) are what the run really holds."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start_kib: dict[str, int] = {}
        self.peak_kib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _update(self) -> None:
        for k, v in rss_fields_kib().items():
            self.peak_kib[k] = max(self.peak_kib.get(k, 0), v)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._update()
            time.sleep(self.interval)

    def __enter__(self) -> RssPeaks:
        self.start_kib = rss_fields_kib()
        self.peak_kib = dict(self.start_kib)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
