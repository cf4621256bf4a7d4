"""Fault injection shared by the tests/test_faults*.py files.

A fault is injected by wrapping a real function so that its N-th call misbehaves (raises, or
presses Cancel), or by making the output file's disk fill up. After a fault, each test checks
the same promise with the helpers at the bottom: no output file, no temporary file and no
worker thread is left behind.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import pytest

import lora_extract.extract.writer as writer


class NewComfyInterrupt(BaseException):
    """Newer ComfyUI's InterruptProcessingException derives from BaseException."""


class OnNthCall:
    """Stands in for ``real``; on call number ``n`` (1-based) runs ``hook`` with the call's
    arguments first. A hook that raises makes that call fail; one that returns lets it go on.

    ``calls`` counts every call, so a test can check that the run stopped at the fault.
    """

    def __init__(self, real: Callable[..., Any], n: int, hook: Callable[..., None]) -> None:
        self.real = real
        self.n = n
        self.hook = hook
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.n:
            self.hook(*args, **kwargs)
        return self.real(*args, **kwargs)


def raising(exc: BaseException) -> Callable[..., NoReturn]:
    """A hook for :class:`OnNthCall` that raises this very ``exc`` object (tests check identity)."""

    def hook(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise exc

    return hook


def fail_on_call(real: Callable[..., Any], n: int, exc: BaseException) -> OnNthCall:
    """``real``, except that call number ``n`` raises ``exc`` instead of running."""
    return OnNthCall(real, n, raising(exc))


class _DiskFills:
    """A file object that accepts ``limit`` bytes, writes part of the next chunk, then fails
    with ENOSPC, as a real full disk does."""

    def __init__(self, f, limit: int) -> None:
        self._f = f
        self._left = limit

    def write(self, b) -> int:
        b = memoryview(b).cast("B")
        if len(b) > self._left:
            self._f.write(b[: self._left])
            self._left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= len(b)
        return self._f.write(b)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Every file the writer opens from now on runs out of space after ``limit`` bytes."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(writer.os, "fdopen", lambda fd, mode: _DiskFills(real_fdopen(fd, mode), limit))


# --- what must be left behind: nothing ------------------------------------------------------

def files_under(folder) -> list[str]:
    """Every file below ``folder`` (hidden temporary files included), relative to it."""
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, fs in os.walk(str(folder)) for f in fs)


def prefetch_threads() -> list[threading.Thread]:
    """The V1 read-ahead workers still alive, whoever started them."""
    return [t for t in threading.enumerate() if t.name == "lora-extract-prefetch"]


def new_threads(before: set[threading.Thread]) -> list[str]:
    """Names of the threads alive now that were not in ``before`` (``set(threading.enumerate())``)."""
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
