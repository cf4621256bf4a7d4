"""DoRA output: LoRA factors plus a per-channel magnitude (``dora_scale``) that ComfyUI's loader
turns back into the fine-tuned weight.

What ComfyUI does with them (``weight_decompose`` in ``comfy/weight_adapter/base.py``, the same
in 0.3.64 and the 2026-08 code), for a base weight ``W``, the LoRA change ``D = alpha/rank * up
@ down`` and the magnitude ``m``; the axis follows from the shape of ``dora_scale``:

- **output axis** (``[out, 1, ...]``: ``dora_scale.shape[0]`` equals the weight's outputs):
  ``W' = m / ||W_i|| * (W + D)`` row by row, where ``||W_i||`` is the norm of row ``i`` of the
  *original* weight (not of ``W + D``), so ``W'`` is linear in ``D``.
- **input axis** (``[1, in, 1, ...]``): ``W' = m / ||(W + D)_j|| * (W + D)`` per input channel
  ``j`` (for a convolution: every output and kernel position of that channel), with the norm of
  the *patched* weight: the magnitude replaces the column's length outright.

Both add ``float32 eps`` to the norm; at strength ``s`` the weight becomes ``W + s (W' - W)``.

**Construction** (one layer, rank ``r``, fine-tuned weight ``T``). Output axis: write
``c = m / ||W_i||`` and ``Y = diag(c) D`` (rank ``r`` as ``D``). The error is
``||diag(c)(W + D) - T|| = ||Y - (T - diag(c) W)||``: a per-row rescale of the base weight plus
a rank-``r`` matrix. For fixed ``c`` the best ``Y`` is the truncated SVD of ``T - diag(c) W``
(Eckart-Young); for fixed ``Y`` each ``c_i`` is a one-dimensional least squares. We alternate,
starting at ``c = 1``, where the first step *is* the plain LoRA: every step can only lower the
error, so DoRA at rank ``r`` is never worse than plain LoRA at rank ``r`` (before clamp and
cast). Input axis: the best magnitude for a direction ``v_j`` is the projection of ``T_j`` on it,
and the error is ``T_j``'s distance to the line through ``v_j``. With ``Y = D diag(c)``, column
``j`` of ``W + D`` is parallel to column ``j`` of ``W diag(c) + Y``, so that distance is at most
``||(W diag(c) + Y - T)_j||``: the same alternation on columns minimises this bound, and at
``c = 1`` the bound is the plain LoRA's error. ``c`` stays within ``[C_MIN, C_MAX]`` (each
coordinate's update is then the constrained minimiser, so the descent still holds): ``D`` is
``Y`` divided by ``c``, and a tiny ``c`` would blow the stored factors up.

Finally the magnitude is refitted to the factors *as stored* (clamped and cast): the
least-squares row scale (output) or the projection (input), and the reported error is that of
ComfyUI's formula applied to the stored tensors.

**File size.** ``dora_scale`` is stored in float32 (one value per output or input channel): in
fp16 its rounding (up to 5e-4 of each channel) would often exceed the whole LoRA's error on the
difference. A plain LoRA could spend those bytes on rank instead; each layer's report gives the
plain LoRA's error at the rank that fits in the same bytes (``lora_same_size_rank``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .clamp import clamp_factors
from .config import ExtractConfig
from .decompose import randomized_svd
from .exact_svd import exact_svd
from .layer import (
    DoraOutput,
    LayerExtraction,
    LoraFactors,
    canonical_signs,
    decompose_and_rank,
    finish_extraction,
    svd_plan,
)
from .norms import frobenius_norm
from .truncated_svd import TruncatedSVD

# Alternation steps after the first (plain-LoRA) one, and when to stop early: a step that lowers
# the error by less than this share of it.
MAX_STEPS = 12
STOP_GAIN = 1e-3
# Bounds of the per-channel rescale c (see the module docstring).
C_MIN, C_MAX = 0.25, 4.0
MAGNITUDE_DTYPE = torch.float32
EPS = torch.finfo(torch.float32).eps


@dataclass
class _Axis:
    """The channel structure of a ``[out, in * k]`` matrix along the DoRA axis."""

    axis: str
    out: int
    inp: int
    k: int

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per channel: the sum of ``a * b`` (float64 accumulation)."""
        prod = a * b
        if self.axis == "output":
            return prod.sum(dim=1, dtype=torch.float64)
        return prod.view(self.out, self.inp, self.k).sum(dim=(0, 2), dtype=torch.float64)

    def scale(self, mat: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``mat`` with each channel multiplied by ``c`` (a new tensor)."""
        c = c.to(mat.dtype)
        if self.axis == "output":
            return mat * c.unsqueeze(1)
        return (mat.view(self.out, self.inp, self.k) * c.view(1, -1, 1)).view(self.out, -1)

    def comfy_norm(self, mat: torch.Tensor) -> torch.Tensor:
        """ComfyUI's per-channel norm (float32, as its ``weight_decompose`` takes it)."""
        if self.axis == "output":
            return mat.norm(dim=1)
        return mat.view(self.out, self.inp, self.k).transpose(0, 1).reshape(self.inp, -1).norm(dim=1)

    def stored_shape(self, ndim: int) -> tuple[int, ...]:
        tail = (1,) * (ndim - 2)
        return (self.out, 1, *tail) if self.axis == "output" else (1, self.inp, *tail)


def layer_axis(axis: str, shape: tuple[int, ...]) -> str:
    """The axis actually used for a weight of ``shape``: ComfyUI reads a ``[1, in]`` magnitude of
    a one-output layer as an output-axis one (its test is ``shape[0] == outputs``)."""
    return "output" if shape[0] == 1 else axis


def _top(mat: torch.Tensor, k: int, cfg: ExtractConfig, cap: int,
         generator: torch.Generator | None, fro2: float) -> TruncatedSVD:
    """The top ``k`` singular triplets by the route a plain extraction of ``mat`` would take."""
    use_exact, _ = svd_plan(*mat.shape, cfg, cap)
    if use_exact:
        return exact_svd(mat, k_max=k).truncate(k)
    return randomized_svd(mat, k, cfg.oversample, cfg.lowrank_iters, generator, fro2=fro2).truncate(k)


def _low_rank(svd: TruncatedSVD) -> torch.Tensor:
    return (svd.U * svd.S.unsqueeze(0)) @ svd.Vh


def comfy_dora_weight(w: torch.Tensor, change: torch.Tensor, magnitude: torch.Tensor,
                      ax: _Axis) -> torch.Tensor:
    """ComfyUI's patched weight (strength 1) from ``[out, in*k]`` float32 matrices."""
    patched = w + change
    norm = ax.comfy_norm(w if ax.axis == "output" else patched) + EPS
    return ax.scale(patched, magnitude.flatten().float() / norm)


def _project_out(mat: torch.Tensor, svd: TruncatedSVD, ax: _Axis) -> torch.Tensor:
    """``mat`` less its part in ``svd``'s row space (output axis) or column space (input axis):
    the residual a rank-``r`` term on that space leaves, which keeps channels separate."""
    if ax.axis == "output":
        return mat - (mat @ svd.Vh.mT) @ svd.Vh
    return mat - svd.U @ (svd.U.mT @ mat)


def _fit_rescale(w: torch.Tensor, wt: torch.Tensor, ax: _Axis, cfg: ExtractConfig, cap: int,
                 rank: int, generator: torch.Generator | None, first: TruncatedSVD
                 ) -> tuple[torch.Tensor, TruncatedSVD]:
    """Minimise ``||T - c W - Y||`` over the rescale ``c`` and rank-``r`` ``Y``.

    Each step: with ``Y``'s subspace fixed, the best ``c`` (per channel, in closed form: the
    least squares of ``W`` against ``T`` once that subspace is projected out; both ``c`` and
    ``Y`` are optimal for it, which converges much faster than fixing ``Y`` itself), then the
    best ``Y`` for that ``c`` (the truncated SVD). Neither step can raise the error, and the
    first subspace is the plain LoRA's. Returns the final ``c`` and ``Y``'s SVD.
    """
    c = torch.ones(w.shape[0] if ax.axis == "output" else ax.inp, dtype=torch.float64,
                   device=w.device)
    svd = first
    resid = wt - ax.scale(w, c) - _low_rank(svd)
    best = frobenius_norm(resid)          # the plain LoRA's error (c = 1)
    del resid
    for _ in range(MAX_STEPS):
        wp, tp = _project_out(w, svd, ax), _project_out(wt, svd, ax)
        wp_sq = ax.dot(wp, wp)
        new_c = torch.where(wp_sq > 0, ax.dot(wp, tp) / wp_sq.clamp_min(1e-300), c)
        new_c = new_c.clamp(C_MIN, C_MAX)
        del wp, tp
        target = wt - ax.scale(w, new_c)
        new_svd = _top(target, rank, cfg, cap, generator, frobenius_norm(target) ** 2)
        target -= _low_rank(new_svd)
        err = frobenius_norm(target)
        del target
        if err >= best:
            break
        c, svd = new_c, new_svd
        gain, best = best - err, err
        if gain < STOP_GAIN * best:
            break
    return c, svd


def _factors(svd: TruncatedSVD, c: torch.Tensor, ax: _Axis, rank: int, cfg: ExtractConfig
             ) -> tuple[torch.Tensor, torch.Tensor, float, float | None, int]:
    """Balanced, clamped, cast factors of ``D = Y / c``; ``(up, down, alpha, threshold, clipped)``."""
    alpha = float(cfg.alpha) if cfg.alpha > 0 else float(rank)
    kept = canonical_signs(svd)
    root = torch.sqrt(kept.S) * math.sqrt(rank / alpha)
    up = kept.U * root.unsqueeze(0)
    down = kept.Vh * root.unsqueeze(1)
    inv = (1.0 / c).to(up.dtype)
    if ax.axis == "output":
        up = up * inv.unsqueeze(1)
    else:
        down = (down.view(rank, ax.inp, ax.k) * inv.view(1, -1, 1)).view(rank, -1)
    threshold, clipped = None, 0
    if cfg.clamp_quantile is not None:
        cu, cd, threshold = clamp_factors(up, down, cfg.clamp_quantile)
        clipped = int((cu != up).sum()) + int((cd != down).sum())
        up, down = cu, cd
    return up.to(cfg.torch_dtype), down.to(cfg.torch_dtype), alpha, threshold, clipped


def _magnitude(w: torch.Tensor, wt: torch.Tensor, change: torch.Tensor, ax: _Axis) -> torch.Tensor:
    """The least-squares magnitude for the stored change (float32, per channel)."""
    patched = w + change
    if ax.axis == "output":
        # W' = (m / ||W_i||) (W + D)_i: the best factor for row i is <v_i, T_i> / ||v_i||^2.
        v_sq = ax.dot(patched, patched)
        c = torch.where(v_sq > 0, ax.dot(patched, wt) / v_sq.clamp_min(1e-300), torch.ones_like(v_sq))
        return (c * (ax.comfy_norm(w).double() + EPS)).to(MAGNITUDE_DTYPE)
    # W' = m_j u_j with u_j the unit direction ComfyUI forms: the best m_j projects T_j on u_j.
    unit = ax.scale(patched, 1.0 / (ax.comfy_norm(patched).double() + EPS))
    return ax.dot(unit, wt).to(MAGNITUDE_DTYPE)


def same_size_rank(rank: int, ax: _Axis, cfg: ExtractConfig, small: int) -> int:
    """The plain-LoRA rank that fits in the bytes of a DoRA layer of ``rank``."""
    channels = ax.out if ax.axis == "output" else ax.inp
    magnitude_bytes = channels * torch.finfo(MAGNITUDE_DTYPE).bits // 8
    rank_bytes = (ax.out + ax.inp * ax.k) * torch.finfo(cfg.torch_dtype).bits // 8
    return min(rank + magnitude_bytes // rank_bytes, small)


def extract_dora_matrix(diff: torch.Tensor, base: torch.Tensor, cfg: ExtractConfig, axis: str, *,
                        fro: float | None = None,
                        generator: torch.Generator | None = None) -> LayerExtraction:
    """DoRA factors and magnitude for ``base + diff`` (float32, 2+ dimensions, same device).

    ``diff`` is consumed (it holds the plain same-size LoRA's residual afterwards). The result's
    ``rel_error`` is ``||W' - T|| / ||T - W||`` with ``W'`` ComfyUI's patched weight from the
    stored tensors, directly comparable with a plain LoRA's ``rel_error``.
    """
    t0 = time.perf_counter()
    shape = tuple(diff.shape)
    out = shape[0]
    k = math.prod(shape[2:])
    ax = _Axis(layer_axis(axis, shape), out, shape[1], k)
    mat = diff.reshape(out, -1)
    if fro is None:
        fro = frobenius_norm(mat)
    w = base.reshape(out, -1).to(device=mat.device, dtype=torch.float32)
    wt = w + mat
    cap = cfg.rank_cap(len(shape))
    first, rank = decompose_and_rank(mat, cfg, cap, fro * fro, generator)
    small = min(mat.shape)
    plain_rank = same_size_rank(rank, ax, cfg, small)
    plain_svd = first if first.U.shape[1] >= plain_rank else _top(
        mat, plain_rank, cfg, plain_rank, generator, fro * fro)
    # The plain LoRA this layer would be at the same bytes, stored as a plain file stores it.
    plain = finish_extraction(diff, plain_svd, plain_rank, fro, cfg, t0)
    del diff, mat
    c, svd = _fit_rescale(w, wt, ax, cfg, cap, rank, generator, first.truncate(rank))
    up, down, alpha, threshold, clipped = _factors(svd, c, ax, rank, cfg)
    change = (up.float() @ down.float()) * (alpha / rank)
    magnitude = _magnitude(w, wt, change, ax)
    err = frobenius_norm(comfy_dora_weight(w, change, magnitude, ax) - wt) / fro if fro > 0 else 0.0
    ideal = frobenius_norm(ax.scale(w, c) + _low_rank(svd) - wt) / fro if fro > 0 else 0.0
    tail = (1,) * (len(shape) - 2)
    factors = LoraFactors(
        up=up.reshape(out, rank, *tail).contiguous().cpu(),
        down=down.reshape(rank, *shape[1:]).contiguous().cpu(), alpha=alpha, rank=rank)
    dora = DoraOutput(scale=magnitude.reshape(ax.stored_shape(len(shape))).contiguous().cpu(),
                      axis=ax.axis, lora_rank=plain_rank, lora_rel_error=plain.rel_error)
    return LayerExtraction(
        factors=factors, rel_error=err, rel_error_unclamped=min(ideal, err),
        clamp_threshold=threshold, clamped_entries=clipped, spectrum=plain.spectrum,
        seconds=time.perf_counter() - t0, dora=dora)
