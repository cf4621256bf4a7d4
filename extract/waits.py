"""Waits that can always be left: by the user (interrupt, Ctrl-C) or by a stall bound.

Every place where a run's main thread waits for another thread (the next loaded layer or
batch, a worker's factors, a thread to stop) waits in short slices through a ``RunWatch``.
Between slices it calls the host's interrupt check (ComfyUI's Cancel raises there) and checks
the stall bound, and because no wait is untimed, Ctrl-C reaches the command line's main thread
at once. So a run stops within one slice of being cancelled, even when a reader thread is stuck
in a read that never returns (that thread is a daemon and is left behind, not waited for).

A stall is an error, not a freeze: when no layer completes for ``stall_timeout_s`` seconds
(default 600, ``LORA_EXTRACT_STALL_TIMEOUT`` in the environment, 0 for never) the waiting
thread raises :class:`ExtractionStalled`, whose message says which thread waits for what
(each wait registers itself here while it lasts) and where the run's other threads are.
"""

from __future__ import annotations

import os
import queue
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

from .callbacks import InterruptFn
from .errors import ExtractionInputError, ExtractionStalled

T = TypeVar("T")

STALL_ENV = "LORA_EXTRACT_STALL_TIMEOUT"
DEFAULT_STALL_S = 600.0
# One wait slice: how late a cancel may be noticed (far below the 2 s users wait at most).
POLL_S = 0.1
# Threads of a run are named with this prefix, so a stall report can find the silent ones.
THREAD_PREFIX = "lora-extract"


def stall_timeout_s() -> float:
    """The stall bound in seconds from ``LORA_EXTRACT_STALL_TIMEOUT`` (0: never), else 600."""
    raw = os.environ.get(STALL_ENV, "").strip()
    if not raw:
        return DEFAULT_STALL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ExtractionInputError(
            f"{STALL_ENV}={raw!r} is not a number of seconds: use e.g. 600, or 0 for no bound.")
    return value



class RunWatch:
    """What the waits of one run share: the interrupt check, the stall clock, who waits for what.

    ``progressed()`` is called whenever a layer completes; ``tick()`` (between wait slices)
    raises the interrupt or :class:`ExtractionStalled`. Thread-safe.
    """

    def __init__(self, check_interrupt: InterruptFn | None = None,
                 stall_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.check_interrupt = check_interrupt
        self.stall_s = stall_timeout_s() if stall_s is None else stall_s
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()
        self._waits: dict[int, tuple[str, str, float]] = {}   # thread id -> (name, what, since)

    def progressed(self) -> None:
        self._last = self._clock()

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Register the calling thread as waiting for ``what`` while the block runs."""
        me = threading.current_thread()
        ident = me.ident or 0
        with self._lock:
            self._waits[ident] = (me.name, what, self._clock())
        try:
            yield
        finally:
            with self._lock:
                self._waits.pop(ident, None)

    def tick(self) -> None:
        """Between wait slices: the user's cancel, then the stall bound."""
        if self.check_interrupt is not None:
            self.check_interrupt()
        idle = self._clock() - self._last
        if self.stall_s and idle > self.stall_s:
            raise ExtractionStalled(
                f"the run stalled: no layer completed for {idle:.0f} s (bound {self.stall_s:g} s, "
                f"set {STALL_ENV} to change it; 0 for no bound). {self.describe()} "
                "No file was written.")

    def describe(self) -> str:
        """Every registered wait, and where the run's other threads are."""
        now = self._clock()
        with self._lock:
            waits = dict(self._waits)
        parts = [f"{name} waits for {what} ({now - since:.0f} s)"
                 for name, what, since in waits.values()]
        frames = sys._current_frames()
        for t in threading.enumerate():
            if t.ident in waits or not t.name.startswith(THREAD_PREFIX):
                continue
            parts.append(f"{t.name} is busy at {_where(frames.get(t.ident or -1))}")
        return "; ".join(parts) + "." if parts else "No thread registered a wait."

    # --- the waits -----------------------------------------------------------------------

    def get(self, q: queue.Queue[T], what: str) -> T:
        """``q.get()`` in slices."""
        with self.waiting(what):
            while True:
                try:
                    return q.get(timeout=POLL_S)
                except queue.Empty:
                    self.tick()

    def result(self, fut: Future[T], what: str) -> T:
        """``fut.result()`` in slices (a worker's exception is raised here)."""
        with self.waiting(what):
            while True:
                try:
                    return fut.result(timeout=POLL_S)
                except FutureTimeout:
                    if fut.done():
                        return fut.result()
                    self.tick()


_STDLIB = sysconfig.get_paths()["stdlib"]


def _where(frame: FrameType | None) -> str:
    """The innermost frame of a thread outside the standard library (a lock's wait says
    nothing; the read or the layer that waits on it does)."""
    while frame is not None and frame.f_code.co_filename.startswith(_STDLIB) and frame.f_back:
        frame = frame.f_back
    if frame is None:
        return "an unknown place"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"


def join_for(thread: threading.Thread, seconds: float) -> bool:
    """Join ``thread`` for at most ``seconds``; whether it ended. Never raises the interrupt:
    it runs on the way out of a run, where the run already stops."""
    deadline = time.monotonic() + seconds
    while thread.is_alive():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        thread.join(timeout=min(POLL_S, left))
    return True


def wait_futures(futures: list[Future[object]], seconds: float) -> bool:
    """Wait at most ``seconds`` for ``futures`` to finish; whether they all did."""
    deadline = time.monotonic() + seconds
    for f in futures:
        while not f.done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                f.exception(timeout=min(POLL_S, left))
            except FutureTimeout:
                continue
            except CancelledError:
                break
    return True
