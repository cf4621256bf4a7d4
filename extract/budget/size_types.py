"""Typed results of size budgets and size curves (kept apart so the report imports no torch code)."""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1 << 20


@dataclass
class CurvePoint:
    """What the allocator would give at ``tensor_bytes``: errors of the truncated SVD.

    Errors are the SVD truncation errors (Eckart-Young, before clamp and dtype cast) that the
    allocation optimises; the stored file's measured errors are in the per-layer report.
    """

    tensor_bytes: int
    mean_rel_error: float          # mean over LoRA layers of ||dW - dW_r|| / ||dW||
    rms_rel_error: float           # sqrt(mean of squared relative errors): the objective
    rank_min: int
    rank_max: int


@dataclass
class SizeCurve:
    """Error against file size from the spectra, from rank 1 everywhere up to the caps."""

    points: list[CurvePoint] = field(default_factory=list)
    chosen: CurvePoint | None = None     # this run's file on the same scale
    header_note: str = ("sizes count the tensors' bytes; the safetensors header (key names, "
                        "shapes, metadata) comes on top")
    partial_note: str = ""               # e.g. spectra shorter than the caps


@dataclass
class BudgetOutcome:
    """What a ``target_size_mb`` run allocated."""

    budget_bytes: int
    used_bytes: int            # tensor bytes of the file (factors, alphas, diffs)
    required_bytes: int        # rank 1 everywhere plus the stored diffs: the least that fits
    # mean: relative squared error removed per byte by the last rank kept (before the fill);
    # worst: the relative squared error its layer had before that rank
    threshold: float
    next_threshold: float      # the same for the first rank left out
    lora_layers: int
    predicted_rms_rel_error: float
    predicted_mean_rel_error: float
    objective: str = "mean"    # "mean" or "worst" (ExtractConfig.size_objective)
    predicted_max_rel_error: float = 0.0
    # Every layer got its rank cap: the caps, not the budget, set the size (bytes were left).
    at_caps: bool = False
