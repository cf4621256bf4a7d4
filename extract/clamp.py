"""Quantile clamp of LoRA factors: no extreme entries, at a bounded cost in error.

The seed's purpose for ``clamp_quantile`` is that the stored factors hold no extreme values.
Clipping every entry of both factors at one q quantile of all of them (KJ's rule) costs a lot on
balanced factors: the leading rank components, which carry most of the energy, have the largest
entries and lose the most, and the factor with fewer entries (``down`` of a tall layer) sits
above the pooled quantile almost entirely. That doubled the error of a typical LoRA (median
2.28x the optimal error, worst layer 9.4x). So each rank component's vector is
measured against itself: the clamp is set by the q quantile of its own absolute entries, and
only entries beyond ``OUTLIER_FACTOR`` times that are clipped; see docs/output-format.md ("The clamp")
and ``benchmarks/clamp_cost.py`` for what each variant costs.

``torch.quantile`` refuses inputs above 2**24 elements; the order statistics here come from
``torch.kthvalue``, which has no such limit and runs on every device, with
``torch.quantile``'s default linear interpolation between the two neighbouring ones.
"""

from __future__ import annotations

import torch

# Clip at this multiple of a vector's own q quantile. At 1.0 (a plain quantile clip) 1% of the
# entries of every vector are clipped, and the leading components lose ~4% of their norm each:
# up to 2.8x the optimal error on low-noise layers. Gaussian-like singular vectors have their
# maximum at about 2x their 0.99 quantile, so 2.0 and above touches only true outliers.
OUTLIER_FACTOR = 2.0


def abs_quantile_rows(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of ``|x|`` along the last dimension, one value per row (float32).

    Same values as ``torch.quantile(x.abs(), q, dim=-1)`` (linear interpolation), for any size.
    """
    a = x.detach().float().abs()
    n = a.shape[-1]
    if n == 0:
        return torch.zeros(a.shape[:-1], dtype=torch.float32, device=a.device)
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(a, lo + 1, dim=-1).values
    if hi == lo:
        return v_lo
    v_hi = torch.kthvalue(a, hi + 1, dim=-1).values
    return torch.lerp(v_lo, v_hi, pos - lo)


def component_thresholds(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip limits for ``up`` ``[out, r]`` (one per column) and ``down`` ``[r, in]`` (one per row).

    Each is ``OUTLIER_FACTOR`` times the ``q`` quantile of that vector's own absolute entries.
    """
    return (abs_quantile_rows(up.mT, q) * OUTLIER_FACTOR,
            abs_quantile_rows(down, q) * OUTLIER_FACTOR)


def clamp_factors(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Clip each column of ``up`` and each row of ``down`` to ``[-t, t]``, t its own limit.

    Returns the clipped factors and the largest limit applied (for the report).
    """
    t_up, t_down = component_thresholds(up, down, q)
    up_c = torch.minimum(torch.maximum(up, -t_up.unsqueeze(0)), t_up.unsqueeze(0))
    down_c = torch.minimum(torch.maximum(down, -t_down.unsqueeze(1)), t_down.unsqueeze(1))
    largest = max(float(t_up.max()), float(t_down.max())) if t_up.numel() else 0.0
    return up_c, down_c, largest
