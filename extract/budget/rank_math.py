"""Ranks for a file size, and the error-against-size curve, from the layers' spectra.

Objective: minimise the sum over LoRA layers of the relative squared truncation error
``e_l(r) = sum_{i>r} sigma_i^2 / ||dW_l||_F^2``. Relative, so every layer counts alike whatever
the scale of its difference (an absolute error would pour the bytes into the few layers with the
largest differences); squared, so each next rank removes ``sigma_{r+1}^2 / ||dW||^2``, which
does not increase with r (concave gain, the condition under which the greedy allocator is within
one rank of the optimum, see ``allocate.py``), and so large errors weigh more than small ones.
A rank's price is its bytes, ``(out + in * kh * kw) * itemsize``; its priority is gain / price.

Bytes are counted exactly as the writer stores them: factors at the output dtype, one float32
alpha per LoRA layer, and the ``.diff`` / ``.diff_b`` tensors at the output dtype. The
safetensors header is the only thing on top.

A second objective, ``worst`` (``size_objective``): the lowest worst-layer error for the bytes.
Each next rank goes to the layer that is worst at that moment (priority: the layer's error
before the rank, whatever it costs), cut where a rank first does not fit (the min-max
allocation, see ``allocate.py``), then the bytes left go on down the same order to the
next-worst layers that still fit. Measured (``benchmarks/size_target_value.py``): ``mean``
gives the lowest mean error, ``worst`` the lowest worst decile, and on the benchmark pairs no
rank combination on the exact frontier (``benchmarks/size_frontier.py``) gives both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ExtractionInputError
from .allocate import Allocation, BudgetTooSmall, GreedyOrder, allocate, greedy_order
from .size_types import MIB, BudgetOutcome, CurvePoint, SizeCurve

ALPHA_BYTES = 4          # alpha is stored as a float32 scalar
CURVE_POINTS = 10
SIZE_OBJECTIVES = ("mean", "worst")


@dataclass
class LayerSpectrum:
    """One LoRA layer as the allocator sees it."""

    key: str
    sigma: torch.Tensor     # float64, descending, at least min(cap, len) values
    energy: float           # ||dW||_F^2 (float64): the error at rank 0
    unit_bytes: int         # bytes one rank costs
    cap: int                # the most ranks the layer may get (>= 1)

    def __post_init__(self) -> None:
        self.sigma = self.sigma.detach().to("cpu", torch.float64).reshape(-1)[: self.cap]
        self.cap = max(1, min(self.cap, self.sigma.numel())) if self.sigma.numel() else 1

    def rel_sq_errors(self) -> torch.Tensor:
        """e(r) for r = 1..cap (float64): what the layer keeps wrong at each rank."""
        left = self.energy - torch.cumsum(self.sigma ** 2, 0)
        return (left.clamp_min(0.0) / self.energy) if self.energy > 0 else torch.zeros_like(left)


def rank_unit_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of one rank of a ``[out, in, k...]`` weight: a column of up, a row of down."""
    return (int(shape[0]) + math.prod(int(d) for d in shape[1:])) * itemsize


def _priorities(layers: Sequence[LayerSpectrum]) -> list[torch.Tensor]:
    """Gain per byte of ranks 2..cap of each layer (rank 1 is required)."""
    out = []
    for layer in layers:
        e = layer.rel_sq_errors()
        gains = e[:-1] - e[1:]       # what rank r+1 removes, r = 1..cap-1
        # Running minimum: exact spectra are sorted already; it guards against rounding so
        # the kept items of a layer are always a prefix (a rank).
        pri = torch.cummin(gains.clamp_min(0.0) / layer.unit_bytes, 0).values if gains.numel() \
            else gains
        out.append(pri)
    return out


def _worst_first(layers: Sequence[LayerSpectrum]) -> list[torch.Tensor]:
    """The layer's relative squared error before each of ranks 2..cap: worst layer first.

    Already non-increasing in the rank (a running sum of squares, clamped at 0), so each
    layer's kept items are a prefix without the guard ``_priorities`` needs for its ratios.
    """
    return [layer.rel_sq_errors()[:-1] for layer in layers]


def too_small_error(budget_bytes: int, need: int, lora_layers: int) -> BudgetTooSmall:
    """The one wording of a budget below the smallest possible file. It names the node's
    inputs; the command line shows its flags instead (``cli/flag_names.py``)."""
    return BudgetTooSmall(
        f"target_size_mb {budget_bytes / MIB:.4g} MiB ({budget_bytes} bytes) is smaller than the "
        f"smallest possible file: rank 1 in each of the {lora_layers} LoRA layers plus the "
        f"stored diffs take {need} bytes; use target_size_mb >= "
        f"{math.ceil(need / MIB * 1000) / 1000:g} (or turn bias_diff off).", need)


def required_bytes(layers: Sequence[LayerSpectrum], fixed_bytes: int) -> int:
    """Rank 1 everywhere, the alphas, and the stored diffs: the smallest possible file's tensors."""
    return fixed_bytes + sum(layer.unit_bytes + ALPHA_BYTES for layer in layers)


@dataclass
class RankPlan:
    ranks: list[int]
    allocation: Allocation
    outcome: BudgetOutcome


def plan_ranks(layers: Sequence[LayerSpectrum], fixed_bytes: int, budget_bytes: int,
               objective: str = "mean") -> RankPlan:
    """Ranks (within each cap) whose bytes fit ``budget_bytes``: the least total error
    (``mean``) or the least worst-layer error (``worst``)."""
    if objective not in SIZE_OBJECTIVES:
        raise ExtractionInputError(f"size_objective {objective!r} is not one of "
                                   f"{', '.join(SIZE_OBJECTIVES)}.")
    need = required_bytes(layers, fixed_bytes)
    worst = objective == "worst"
    try:
        alloc = allocate(_worst_first(layers) if worst else _priorities(layers),
                         [x.unit_bytes for x in layers], budget_bytes, required_bytes=need,
                         fill=worst)
    except BudgetTooSmall as e:
        raise too_small_error(budget_bytes, need, len(layers)) from e
    ranks = [1 + c for c in alloc.counts]
    errs = [float(x.rel_sq_errors()[r - 1]) if x.sigma.numel() else 0.0
            for x, r in zip(layers, ranks, strict=True)]
    n = max(1, len(layers))
    outcome = BudgetOutcome(
        budget_bytes=int(budget_bytes), used_bytes=alloc.used_bytes, required_bytes=need,
        threshold=alloc.threshold, next_threshold=alloc.next_priority, lora_layers=len(layers),
        predicted_rms_rel_error=math.sqrt(sum(errs) / n),
        predicted_mean_rel_error=sum(math.sqrt(e) for e in errs) / n, objective=objective,
        predicted_max_rel_error=math.sqrt(max(errs, default=0.0)),
        at_caps=all(r >= x.cap for x, r in zip(layers, ranks, strict=True)))
    return RankPlan(ranks, alloc, outcome)


def _point(tensor_bytes: int, errs: torch.Tensor, ranks: torch.Tensor) -> CurvePoint:
    return CurvePoint(tensor_bytes=int(tensor_bytes),
                      mean_rel_error=float(errs.clamp_min(0).sqrt().mean()) if errs.numel() else 0.0,
                      rms_rel_error=float(errs.mean().sqrt()) if errs.numel() else 0.0,
                      rank_min=int(ranks.min()) if ranks.numel() else 0,
                      rank_max=int(ranks.max()) if ranks.numel() else 0)


def size_curve(layers: Sequence[LayerSpectrum], fixed_bytes: int,
               points: int = CURVE_POINTS) -> SizeCurve:
    """What the allocator gives at ``points`` budgets evenly spread from rank 1 to the caps."""
    need = required_bytes(layers, fixed_bytes)
    go: GreedyOrder = greedy_order(_priorities(layers), [x.unit_bytes for x in layers], need)
    table = [x.rel_sq_errors() for x in layers]
    top = int(go.running_bytes[-1]) if go.running_bytes.numel() else need
    budgets = sorted({need + (top - need) * i // max(1, points - 1) for i in range(points)})
    # Walk the one order once, stopping at each budget (budgets ascend).
    errs = torch.tensor([float(t[0]) if t.numel() else 0.0 for t in table], dtype=torch.float64)
    ranks = torch.ones(len(layers), dtype=torch.int64)
    out: list[CurvePoint] = []
    j = 0
    n = go.running_bytes.numel()
    for b in budgets:
        while j < n and int(go.running_bytes[j]) <= b:
            g = int(go.group[j])
            ranks[g] += 1
            errs[g] = float(table[g][int(ranks[g]) - 1])
            j += 1
        used = int(go.running_bytes[j - 1]) if j else need
        out.append(_point(used, errs, ranks))
    return SizeCurve(points=out)


def point_for_ranks(layers: Sequence[LayerSpectrum], ranks: Sequence[int],
                    fixed_bytes: int) -> CurvePoint:
    """A given set of ranks (e.g. this run's) on the curve's scale."""
    errs = torch.tensor([float(x.rel_sq_errors()[min(r, x.cap) - 1]) if x.sigma.numel() else 0.0
                         for x, r in zip(layers, ranks, strict=True)], dtype=torch.float64)
    used = fixed_bytes + sum(r * x.unit_bytes + ALPHA_BYTES for x, r in zip(layers, ranks, strict=True))
    return _point(used, errs, torch.tensor(list(ranks), dtype=torch.int64))


MAX_TARGET_MB = 1 << 20     # 1 TiB: above any model; a larger value is a typo


def check_target_size(mb: float) -> None:
    """Refuse a budget that cannot be meant (negative, NaN, infinite, absurd)."""
    if not isinstance(mb, (int, float)) or isinstance(mb, bool) or mb != mb or \
            not 0 <= mb <= MAX_TARGET_MB:
        raise ExtractionInputError(
            f"target_size_mb {mb!r} is not a size: use 0 (off) or a number of MiB in "
            f"(0, {MAX_TARGET_MB}], e.g. 64.")
