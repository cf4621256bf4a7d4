"""Orthonormal bases of tall blocks for the randomized SVD: Householder QR, and the cheaper
Cholesky-QR the power iterations normalise with."""

from __future__ import annotations

import torch


def orthonormal(y: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


# Cholesky-QR falls back to Householder QR when the smallest pivot of R is below this share of
# the largest: past it the float32 triangular solve would lose the basis' weak directions
# (orthogonality error ~ float32 eps x the pivot ratio), and an exactly rank-deficient block
# (a difference of lower rank than the sketch) has no Cholesky factor at all.
CHOLQR_MIN_PIVOT = 1e-4


# Between power iterations Cholesky-QR reads a float32 Gram matrix when its pivots say the
# block is this well conditioned (smallest / largest pivot, i.e. about 1 / cond): its rounding
# (~float32 eps x cond^2 of the smallest eigenvalue, <= 6e-4 here) leaves the basis orthonormal
# to ~1e-3, which spans the same columns and is all an iteration needs; the kept-energy
# estimates read from it moved by ~1e-6 of the left-out energy (measured on SDXL-like and clean
# low-rank layers), 200x below the stop test's tolerance. Half the cost of the float64 Gram
# (0.62 vs 1.23 ms at 10240 x 48: no float64 copy, a float32 GEMM).
CHOLQR_FAST_MIN_PIVOT = 1e-2


def cholesky_qr(y: torch.Tensor, precise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A basis ``q`` of the columns of ``y`` ``[..., M, w]`` and ``r`` (float64) with ``y = q r``.

    Between power iterations only the span of the basis matters, not its exact orthogonality:
    a Gram matrix (``w x w``), its Cholesky factor and one float32 GEMM with ``r^-1`` replace
    LAPACK's Householder QR, which on a tall ``M x 48`` block is a sequence of small level-2
    steps (measured 1.5-10x slower, the most on a busy machine, where each step's thread
    barrier waits for a core). ``r`` has the singular values of ``y`` (float64), which is what
    the convergence test reads. ``precise``: the Gram matrix in float64 (``q`` orthonormal to
    float32 rounding); otherwise float32 where the block is well conditioned
    (``CHOLQR_FAST_MIN_PIVOT``). Householder QR when the pivots say Cholesky is unsafe.
    """
    if not precise:
        r, info = torch.linalg.cholesky_ex((y.mT @ y).double(), upper=True)
        if _pivots_above(r, info, CHOLQR_FAST_MIN_PIVOT):
            return y @ inverse_upper(r).to(y.dtype), r
    y64 = y.double()
    r, info = torch.linalg.cholesky_ex(y64.mT @ y64, upper=True)
    del y64
    if not _pivots_above(r, info, CHOLQR_MIN_PIVOT):
        q, rq = torch.linalg.qr(y, mode="reduced")
        return q, rq.double()
    return y @ inverse_upper(r).to(y.dtype), r


def _pivots_above(r: torch.Tensor, info: torch.Tensor, share: float) -> bool:
    """Whether every Cholesky factor in ``r`` exists and its smallest pivot is above ``share``
    of its largest."""
    if bool((info != 0).any()):
        return False
    pivots = r.diagonal(dim1=-2, dim2=-1)
    return bool((pivots.amin(-1) > share * pivots.amax(-1)).all())


def inverse_upper(r: torch.Tensor) -> torch.Tensor:
    """``r^-1`` of an upper-triangular ``[..., w, w]`` (float64, as ``r``).

    ``y @ r^-1`` is one GEMM: 2-3x faster on the CPU than a triangular solve against a tall
    ``y`` (0.34 vs 1.1 ms at 12288 x 48), with the same result to float32 rounding."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device).expand_as(r)
    return torch.linalg.solve_triangular(r, eye, upper=True)
