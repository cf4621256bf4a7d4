"""The callbacks every engine takes (V1, size budget, block-swap, resize, validation)."""

from __future__ import annotations

from collections.abc import Callable

# progress(done, total, key) after each layer; check_interrupt() raises to stop between layers.
ProgressFn = Callable[[int, int, str], None]
InterruptFn = Callable[[], None]
