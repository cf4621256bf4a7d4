"""Score every dimension of every layer, then pick which to keep (by threshold or by size).

score_i = log10(rescale * sigma_i) - sum_j w_j * log10(ref_j), with references:

- ``spn_ckpt``: spectral norm of the base layer; ``fro_ckpt``: its Frobenius norm;
- ``spn_lora``: the LoRA layer's largest sigma; ``fro_lora``: its Frobenius norm (both of the
  unscaled LoRA, so ``rescale`` shifts these scores);
- ``subspace``: |<u_i, W_base v_i>|, per dimension;
- ``params``: parameters one dimension costs (out + in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..extract.budget.allocate import BudgetTooSmall, allocate
from ..extract.errors import ExtractionInputError
from .decompose import DecomposedLayer
from .recipe import Recipe

QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
_TINY = 1e-30  # log10 floor: a zero reference would give an infinite score


def _log10(x: float) -> float:
    return math.log10(max(x, _TINY))


def layer_scores(layer: DecomposedLayer, recipe: Recipe) -> torch.Tensor:
    """Scores of one layer's dimensions (float64, same order as S)."""
    s = layer.S.detach().to("cpu", torch.float64)
    scores = torch.log10(s.clamp_min(_TINY)) + math.log10(recipe.rescale)
    offset = 0.0
    for method, w in recipe.weights:
        if method == "spn_ckpt":
            offset += w * _log10(_need(layer.base_spn, layer, method))
        elif method == "fro_ckpt":
            offset += w * _log10(_need(layer.base_fro, layer, method))
        elif method == "spn_lora":
            offset += w * _log10(float(s[0]) if s.numel() else 0.0)
        elif method == "fro_lora":
            offset += w * _log10(float(torch.linalg.vector_norm(s, dtype=torch.float64)))
        elif method == "params":
            offset += w * math.log10(layer.params_per_rank())
        elif method == "subspace":
            sub = _need(layer.subspace, layer, method)
            scores = scores - w * torch.log10(sub.to("cpu", torch.float64).clamp_min(_TINY))
    return scores - offset


def _need(value, layer: DecomposedLayer, method: str):
    if value is None:  # a programming error: the pipeline computes what recipes need
        raise RuntimeError(f"{method} needs a base statistic that was not computed for {layer.prefix}")
    return value


@dataclass
class Selection:
    """What one recipe keeps: a keep-mask per layer and the threshold that produced it."""

    threshold: float
    masks: list[torch.Tensor]
    scores: list[torch.Tensor]
    kept_bytes: int
    quantiles: list[tuple[float, float]]


def bytes_per_dim(layer: DecomposedLayer, elem_size: int) -> int:
    return layer.params_per_rank() * elem_size


def select(layers: list[DecomposedLayer], recipe: Recipe, elem_size: int,
           fixed_bytes: int = 0) -> Selection:
    """Apply ``recipe``: keep score >= thr, or the best dimensions that fit in size MiB.

    ``fixed_bytes`` (tensors copied unchanged) count against the size budget.
    """
    scores = [layer_scores(layer, recipe) for layer in layers]
    flat = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
    if recipe.size_mib is not None:
        threshold = _size_threshold(layers, scores, flat, recipe, elem_size, fixed_bytes)
    else:
        threshold = float(recipe.threshold)
    masks = [s >= threshold for s in scores]
    if recipe.max_rank is not None:
        masks = [_cap(m, s, recipe.max_rank) for m, s in zip(masks, scores, strict=True)]
    kept = sum(int(m.sum()) * bytes_per_dim(layer, elem_size) for m, layer in zip(masks, layers, strict=True))
    quantiles = []
    if flat.numel():
        values = np.quantile(flat.numpy(), QUANTILES)
        quantiles = [(q, float(v)) for q, v in zip(QUANTILES, values, strict=True)]
    return Selection(threshold=threshold, masks=masks, scores=scores, kept_bytes=kept, quantiles=quantiles)


def _cap(mask: torch.Tensor, scores: torch.Tensor, max_rank: int) -> torch.Tensor:
    """Of the kept dimensions, the ``max_rank`` best by score (a ``rank=`` cap)."""
    if int(mask.sum()) <= max_rank:
        return mask
    masked = torch.where(mask, scores, torch.full_like(scores, -math.inf))
    best = torch.topk(masked, max_rank).indices
    out = torch.zeros_like(mask)
    out[best] = True
    return out


def _size_threshold(layers: list[DecomposedLayer], scores: list[torch.Tensor], flat: torch.Tensor,
                    recipe: Recipe, elem_size: int, fixed_bytes: int) -> float:
    """Keep dimensions by score, best first, while the running bytes fit the target.

    The shared allocator (``extract/budget/allocate.py``, also behind extraction's ``target_size_mb``)
    does the cut. Returns the score of the last dimension kept (so ``score >= threshold`` keeps
    exactly those, ties aside), or -inf when everything fits.
    """
    assert recipe.size_mib is not None
    budget = int(recipe.size_mib * (1 << 20))
    costs = [bytes_per_dim(layer, elem_size) for layer in layers]
    try:
        alloc = allocate(scores, costs, budget, required_bytes=fixed_bytes)
    except BudgetTooSmall:
        alloc = None
    if alloc is None or (alloc.kept == 0 and flat.numel() > 0):
        first = int(costs[int(torch.argmax(torch.tensor([float(s.max()) if s.numel() else -math.inf
                                                          for s in scores])))]) if costs else 0
        raise ExtractionInputError(
            f"score recipe {recipe.text!r}: size={recipe.size_mib} MiB is smaller than a single "
            f"dimension ({first} bytes) plus the copied tensors ({fixed_bytes} "
            "bytes). Give a larger size.")
    return alloc.threshold
