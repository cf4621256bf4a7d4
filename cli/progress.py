"""The command line's one progress bar: tqdm on stderr, per layer, current key as postfix.

Shown on a terminal; in a pipe or CI log it stays quiet unless LORA_EXTRACT_PROGRESS=1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def progress_bar(desc: str) -> Callable[[int, int, str], None]:
    """A ``progress(done, total, key)`` callback drawing a tqdm bar."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, key: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr,
                       disable=not sys.stderr.isatty() and os.environ.get("LORA_EXTRACT_PROGRESS") != "1")
        bar.set_postfix_str(key[-48:], refresh=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()
    return update
