"""Quantile clamp of LoRA factors, for any tensor size.

``torch.quantile`` refuses inputs above 2**24 elements and is slow below that; a partial sort
(``numpy.partition``) has no size limit and finds the same order statistics. We reproduce
``torch.quantile``'s default linear interpolation between the two neighbouring order statistics.
"""

from __future__ import annotations

import numpy as np
import torch


def abs_quantile(tensors: list[torch.Tensor], q: float) -> float:
    """The ``q`` quantile of the absolute values of all entries of ``tensors`` together."""
    flat = np.concatenate([t.detach().float().abs().reshape(-1).cpu().numpy() for t in tensors])
    if flat.size == 0:
        return 0.0
    pos = q * (flat.size - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, flat.size - 1)
    part = np.partition(flat, [lo, hi]) if hi != lo else np.partition(flat, lo)
    frac = pos - lo
    return float(part[lo] + (part[hi] - part[lo]) * frac)


def clamp_factors(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Clip both factors to ``[-t, t]``, t the ``q`` quantile of their absolute entries."""
    t = abs_quantile([up, down], q)
    return up.clamp(-t, t), down.clamp(-t, t), t
