"""What each ``vram_usage_mode`` means, and the limits of the memory knobs.

The bottom of the memory options: the option declarations (``options.py``) read the modes and
limits for their choices and ranges, and the planner (``planner.py``) reads the modes' defaults;
neither needs the other to know them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModeDefaults:
    """What a ``vram_usage_mode`` means."""

    budget_fraction: float      # share of free device memory the run may use
    blocks_in_gpu: int | None   # blocks kept resident; None: every block that fits
    batch_size: int
    prefetch_ahead: int
    sequential: bool = False    # one layer at a time, nothing resident, whatever the knobs say


MODES: dict[str, ModeDefaults] = {
    "conservative": ModeDefaults(0.50, 0, 1, 1, sequential=True),
    "balanced": ModeDefaults(0.75, 10, 4, 2),
    "aggressive": ModeDefaults(0.90, 20, 6, 4),
    "maximum": ModeDefaults(0.95, None, 8, 8),
}
MAX_BLOCKS, MAX_BATCH, MAX_PREFETCH = 40, 8, 10
