"""Truncated SVD of a weight difference: exact (LAPACK) and randomized (Halko et al.).

Both return the top singular triplets of a 2-D float32 matrix. The exact path never asks for
full matrices and always factorizes the tall orientation, which is what makes it several times
faster than ``torch.linalg.svd(W)`` on the wide/tall layers of diffusion models. The randomized
path sketches with a Gaussian test matrix, runs power iterations with re-orthonormalization
(QR each half-step: without it the sketch collapses onto the top singular vector in float32),
and finishes with an exact SVD of the small projected matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TruncatedSVD:
    """Top-k singular triplets: ``A ~= U @ diag(S) @ Vh``; S descending."""

    U: torch.Tensor   # [m, k]
    S: torch.Tensor   # [k]
    Vh: torch.Tensor  # [k, n]

    def truncate(self, k: int) -> TruncatedSVD:
        return TruncatedSVD(self.U[:, :k], self.S[:k], self.Vh[:k, :])


def exact_svd(a: torch.Tensor) -> TruncatedSVD:
    """Thin SVD of ``a`` (all min(m, n) triplets), computed on the tall orientation."""
    m, n = a.shape
    if m >= n:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return TruncatedSVD(u, s, vh)
    # LAPACK's divide-and-conquer is much slower on wide matrices; factorize the transpose.
    u, s, vh = torch.linalg.svd(a.T, full_matrices=False)
    return TruncatedSVD(vh.T, s, u.T)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def randomized_svd(a: torch.Tensor, k: int, oversample: int, niter: int,
                   generator: torch.Generator | None = None) -> TruncatedSVD:
    """Top-``k`` triplets of ``a`` by a randomized range finder.

    ``oversample`` extra sketch columns and ``niter`` power iterations trade time for accuracy;
    the smallest returned singular values are the least accurate (they run low), which is why
    callers that choose a rank from them oversample past the rank cap.
    """
    m, n = a.shape
    width = min(k + oversample, m, n)
    # Sketch the side that makes the tall QR factors the smaller ones.
    transposed = m < n
    mat = a.T if transposed else a            # [M, N] with M >= N
    omega = torch.randn(mat.shape[1], width, generator=generator, dtype=a.dtype, device="cpu")
    omega = omega.to(a.device)
    q = _orthonormal(mat @ omega)             # [M, width]
    for _ in range(niter):
        z = _orthonormal(mat.T @ q)           # [N, width]
        q = _orthonormal(mat @ z)
    b = q.T @ mat                             # [width, N]
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub
    k = min(k, width)
    u, s, vh = u[:, :k], s[:k], vh[:k, :]
    if transposed:
        return TruncatedSVD(vh.T, s, u.T)
    return TruncatedSVD(u, s, vh)


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """All singular values, descending, from the smaller Gram matrix (cheaper than svdvals).

    Accumulated in float64: the Gram matrix squares the condition number, and float64 keeps
    the top values exact to float32 precision, which is all a rank rule needs.
    """
    m, n = a.shape
    small = a if m <= n else a.T
    g = (small @ small.T).double()
    ev = torch.linalg.eigvalsh(g).clamp_min_(0).sqrt_()
    return ev.flip(0).float()
