"""Per-layer extraction: one weight difference in, LoRA factors and their measured error out.

This is a pure function of the difference tensor and the options. It is shared by the
streaming pipeline, the ComfyUI nodes and the V2 block-swap manager, so all of them store
identical factors for identical inputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from .clamp import clamp_factors
from .config import ExtractConfig
from .decompose import randomized_svd
from .exact_svd import exact_svd, singular_values
from .norms import frobenius_norm
from .rank_rules import RULE_NEEDS, SpectrumTotals, select_rank
from .truncated_svd import TruncatedSVD

# When the randomized sketch would be this large a share of the smaller side, an exact SVD
# is as cheap and has no estimation error.
RANDOMIZED_MAX_FRACTION = 0.25
# How many leading singular values a result keeps for reports and charts.
SPECTRUM_KEEP = 256


def layer_kind(shape: tuple[int, ...]) -> str:
    """A short name for the layer family a weight shape belongs to."""
    if len(shape) == 2:
        return "linear"
    if len(shape) == 4:
        return "conv1x1" if shape[2:] == (1, 1) else "conv"
    if len(shape) == 5:
        return "conv3d"
    if len(shape) == 3:
        return "conv1d"
    return "vector" if len(shape) == 1 else "scalar"


@dataclass
class LoraFactors:
    """Stored factors of one layer: ``(alpha / rank) * up @ down ~= dW`` at strength 1."""

    up: torch.Tensor      # [out, r, 1...] in the output dtype
    down: torch.Tensor    # [r, in, k...] in the output dtype
    alpha: float
    rank: int


@dataclass
class DoraOutput:
    """The DoRA part of a layer (``extract/dora.py``), and the plain LoRA it is compared with."""

    scale: torch.Tensor     # dora_scale as stored: float32, [out, 1, ...] or [1, in, 1, ...]
    axis: str               # "output" or "input"
    lora_rank: int          # rank of the plain LoRA that fits in the same bytes
    lora_rel_error: float   # that plain LoRA's error (clamped and cast, as a file stores it)


@dataclass
class LayerExtraction:
    """What extracting one matrix produced, and how well it reproduces the difference."""

    factors: LoraFactors
    rel_error: float               # ||dW - stored||_F / ||dW||_F, after clamp and dtype cast
    rel_error_unclamped: float     # same, of the truncated SVD before clamp and cast
    clamp_threshold: float | None  # largest |entry| limit applied by the clamp, None when off
    clamped_entries: int = 0       # factor entries the clamp changed
    spectrum: list[float] = field(default_factory=list)   # leading singular values (computed)
    seconds: float = 0.0
    dora: DoraOutput | None = None   # set when the layer is stored as DoRA


def svd_plan(m: int, n: int, cfg: ExtractConfig, cap: int) -> tuple[bool, int]:
    """Whether an ``m x n`` matrix gets an exact SVD, and the randomized sketch rank if not.

    Shared with the batched path (``extract/batched.py``) so both decompose alike.
    """
    small = min(m, n)
    # Adaptive rules look past the cap: oversampling makes the estimates near the cap accurate.
    width = min(cap, small) + cfg.oversample
    use_exact = cfg.algorithm == "svd_linalg" or width >= RANDOMIZED_MAX_FRACTION * small
    k = min(cap, small) if cfg.lora_type == "standard" else min(small, width)
    return use_exact, k


def choose_rank(mat: torch.Tensor, svd: TruncatedSVD, exact: bool, cfg: ExtractConfig, cap: int,
                fro2: float) -> int:
    """The rank the configured rule picks from ``svd`` (computed exactly or randomized)."""
    small = min(mat.shape)
    if exact:
        totals = SpectrumTotals(nuclear=float(svd.S.double().sum()), energy=fro2)
    else:
        need = RULE_NEEDS[cfg.lora_type]
        nuclear = float(singular_values(mat).double().sum()) if "nuclear" in need else None
        totals = SpectrumTotals(nuclear=nuclear, energy=fro2)
    return select_rank(cfg.lora_type, svd.S, cfg.adaptive_param, cap, small, totals)


def decompose_and_rank(mat: torch.Tensor, cfg: ExtractConfig, cap: int, fro2: float,
               generator: torch.Generator | None) -> tuple[TruncatedSVD, int]:
    """Decompose ``mat`` and choose the rank by the configured rule."""
    m, n = mat.shape
    use_exact, k = svd_plan(m, n, cfg, cap)
    if use_exact:
        svd = exact_svd(mat, k_max=min(cap, min(m, n)))
    else:
        svd = randomized_svd(mat, k, cfg.oversample, cfg.lowrank_iters, generator, fro2=fro2)
    return svd, choose_rank(mat, svd, use_exact, cfg, cap, fro2)


def extract_matrix(diff: torch.Tensor, cfg: ExtractConfig, *, fro: float | None = None,
                   generator: torch.Generator | None = None) -> LayerExtraction:
    """Extract LoRA factors from a float32 weight difference of 2 or more dimensions.

    ``diff`` is consumed: it may be overwritten with the residual to measure the error
    without a second full-size buffer. ``fro`` is ``||diff||_F`` if the caller already has it.
    """
    t0 = time.perf_counter()
    mat = diff.reshape(diff.shape[0], -1)
    if fro is None:
        fro = frobenius_norm(mat)
    cap = cfg.rank_cap(diff.dim())
    svd, rank = decompose_and_rank(mat, cfg, cap, fro * fro, generator)
    return finish_extraction(diff, svd, rank, fro, cfg, t0)


def canonical_signs(svd: TruncatedSVD) -> TruncatedSVD:
    """Flip each singular pair so the largest-magnitude entry of its left vector is positive.

    Singular vectors are defined up to a sign, and different SVD routes (LAPACK, Gram
    eigenvectors, batched cuSOLVER) pick different ones; fixing the sign makes the stored
    factors the same whichever route (or device) computed them.
    """
    idx = svd.U.abs().argmax(dim=0, keepdim=True)
    sign = torch.sign(torch.gather(svd.U, 0, idx)).squeeze(0)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return replace(svd, U=svd.U * sign, Vh=svd.Vh * sign.unsqueeze(1))


# The error of factors stored as computed (float32, no clamp) is ||dW||^2 - kept energy where
# the left-out energy is at least this share of ||dW||^2: the kept energy's rounding (~6e-7 of
# ||dW||^2, measured) then moves the error by < 3e-5 of itself. This needs singular values
# exact for the kept vectors, which every route returns (the randomized one projects in float32
# after a bfloat16 Rayleigh-Ritz step: ``decompose._float32_projection``). Below it (a
# difference kept almost whole), and for clamped or cast factors, the residual is measured.
MEASURE_BELOW_SHARE = 1e-2


def finish_extraction(diff: torch.Tensor, svd: TruncatedSVD, rank: int, fro: float,
                      cfg: ExtractConfig, t0: float) -> LayerExtraction:
    """Balanced, clamped, cast factors of ``diff`` from its decomposition, and their error.

    ``diff`` is consumed (it may be overwritten with the residual). ``t0`` is when the
    layer's work began.
    """
    shape = tuple(diff.shape)
    out_dim = shape[0]
    mat = diff.reshape(out_dim, -1)
    fro2 = fro * fro
    kept = canonical_signs(svd.truncate(rank))
    # Eckart-Young: an orthogonal projection's error is exactly the energy it leaves out. With
    # the whole spectrum at hand (exact path) sum the discarded values directly; otherwise
    # (randomized) subtract the kept energy from ||dW||^2.
    if svd.S.numel() == min(mat.shape):
        left_out = float((svd.S[rank:].double() ** 2).sum())
    else:
        left_out = max(fro2 - float((kept.S.double() ** 2).sum()), 0.0)
    unclamped = math.sqrt(left_out) / fro if fro > 0 else 0.0

    alpha = float(cfg.alpha) if cfg.alpha > 0 else float(rank)
    # Balanced factors (sqrt(S) on both sides), scaled so that alpha/rank * up @ down == dW.
    root = torch.sqrt(kept.S) * math.sqrt(rank / alpha)
    up = kept.U * root.unsqueeze(0)
    down = kept.Vh * root.unsqueeze(1)
    threshold = None
    clipped = 0
    if cfg.clamp_quantile is not None:
        clamped_up, clamped_down, threshold = clamp_factors(up, down, cfg.clamp_quantile)
        clipped = int((clamped_up != up).sum()) + int((clamped_down != down).sum())
        up, down = clamped_up, clamped_down
    up_out = up.to(cfg.torch_dtype)
    down_out = down.to(cfg.torch_dtype)

    if clipped == 0 and cfg.torch_dtype == torch.float32 and left_out >= MEASURE_BELOW_SHARE * fro2:
        # The stored factors are the truncated SVD's own and leave out enough energy that
        # ||dW||^2 - kept has no cancellation to speak of: that is the error (within 1.5e-5 of
        # it, measured on six kinds of pair), without a residual product and a pass over it.
        rel_error = unclamped
    else:
        # Residual in place: dW - (alpha/rank) * up @ down, with the factors as stored.
        mat.addmm_(up_out.float(), down_out.float(), alpha=-(alpha / rank))
        rel_error = frobenius_norm(mat) / fro if fro > 0 else 0.0
        if clipped == 0 and cfg.torch_dtype == torch.float32:
            # Nothing was added to the truncated SVD's factors, and the measured error is the
            # more accurate of the two numbers (no cancellation in ||dW||^2 - kept).
            unclamped = rel_error

    tail = (1,) * (len(shape) - 2)
    factors = LoraFactors(
        up=up_out.reshape(out_dim, rank, *tail).contiguous().cpu(),
        down=down_out.reshape(rank, *shape[1:]).contiguous().cpu(),
        alpha=alpha, rank=rank)
    return LayerExtraction(
        factors=factors, rel_error=rel_error, rel_error_unclamped=unclamped,
        clamp_threshold=threshold, clamped_entries=clipped, spectrum=svd.S[:SPECTRUM_KEEP].tolist(),
        seconds=time.perf_counter() - t0)
