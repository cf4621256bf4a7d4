"""Refuse a size budget that cannot fit before the spectra pass, not after it.

The smallest file a budget can give is rank 1 on every LoRA layer, one alpha each, and the
differences stored as they are (``.diff`` / ``.diff_b``): all of it follows from the shapes,
once we know which parameters changed. Assuming every parameter changed gives an upper bound
from the shapes alone, with no read: a budget at or above it always fits. Only a budget below it
needs the exact figure, and that costs one read of both models (differences and their norms, no
SVD), a fraction of the spectra pass it saves; a budget still below the exact figure is refused
with the smallest size that fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..change_threshold import small_change_reason
from ..config import ExtractConfig
from ..pair_output import needs_svd, stored_role
from ..pairing import KeyPair, PairPlan
from .rank_math import ALPHA_BYTES, rank_unit_bytes, too_small_error
from .report_curve import stored_diff_bytes

LoadFn = Callable[[KeyPair], tuple[torch.Tensor, float]]


def pair_min_bytes(pair: KeyPair, fro: float, cfg: ExtractConfig, plan: PairPlan,
                   itemsize: int) -> int:
    """Bytes ``pair`` takes at the least: rank 1 (+ alpha), its stored difference, or nothing.

    The same decision as the extraction (``needs_svd`` / ``stored_role``)."""
    if fro == 0.0 or small_change_reason(pair, fro, cfg, plan) is not None:
        return 0
    if needs_svd(pair, fro, cfg, plan):
        return rank_unit_bytes(pair.shape, itemsize) + ALPHA_BYTES
    if cfg.bias_diff and stored_role(pair, cfg, plan) is not None:
        return stored_diff_bytes(pair.shape, itemsize)
    return 0


def smallest_bytes(cfg: ExtractConfig, plan: PairPlan, fro_of: Callable[[KeyPair], float]) -> int:
    itemsize = torch.empty((), dtype=cfg.torch_dtype).element_size()
    return sum(pair_min_bytes(p, fro_of(p), cfg, plan, itemsize) for p in plan.common)


def check_budget_fits(cfg: ExtractConfig, plan: PairPlan, load: LoadFn) -> None:
    """Raise ``BudgetTooSmall`` when ``cfg``'s budget is below the smallest possible file.

    ``load(pair)`` gives ``(difference, frobenius norm)``; called only when the shapes alone
    cannot settle it."""
    budget = cfg.budget_bytes
    if budget <= 0:
        return
    # Every layer taken as changed beyond any min_change threshold: the largest minimum.
    if budget >= smallest_bytes(cfg, plan, lambda _p: math.inf):
        return
    norms: dict[str, float] = {}
    for pair in plan.common:
        diff, fro = load(pair)
        del diff
        norms[pair.tuned_key] = fro
    need = smallest_bytes(cfg, plan, lambda p: norms[p.tuned_key])
    if budget < need:
        layers = sum(needs_svd(p, norms[p.tuned_key], cfg, plan) for p in plan.common)
        raise too_small_error(budget, need, layers)
