"""The command line's one progress bar: tqdm on stderr, per layer, current key as postfix.

Shown on a terminal; in a pipe or CI log it stays quiet unless LORA_EXTRACT_PROGRESS=1.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable


def _shown() -> bool:
    return sys.stderr.isatty() or os.environ.get("LORA_EXTRACT_PROGRESS") == "1"


def progress_bar(desc: str) -> Callable[[int, int, str], None]:
    """A ``progress(done, total, key)`` callback drawing a tqdm bar (doing nothing where the
    bar is not shown)."""
    if not _shown():
        return lambda done, total, key: None
    from tqdm import tqdm

    # The command line's bars live in one process: a thread lock is enough. tqdm's default
    # lock also creates a multiprocessing lock (its import and semaphore ~3 ms to 0.08 s).
    tqdm.set_lock(threading.RLock())
    bar = None

    def update(done: int, total: int, key: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr)
        bar.set_postfix_str(key[-48:], refresh=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()
    return update
