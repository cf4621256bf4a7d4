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

from .norms import gram_float64


@dataclass
class TruncatedSVD:
    """Top-k singular triplets: ``A ~= U @ diag(S) @ Vh``; S descending."""

    U: torch.Tensor   # [m, k]
    S: torch.Tensor   # [k]
    Vh: torch.Tensor  # [k, n]

    def truncate(self, k: int) -> TruncatedSVD:
        return TruncatedSVD(self.U[:, :k], self.S[:k], self.Vh[:k, :])


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, transposed: bool) -> TruncatedSVD:
    # Undo the transposition used to factorize a wide matrix: A^T = U S Vh  =>  A = Vh^T S U^T.
    return TruncatedSVD(vh.mT, s, u.mT) if transposed else TruncatedSVD(u, s, vh)


# Above this aspect ratio a float64 Gram eigendecomposition of the small side beats LAPACK's
# thin SVD on the CPU (measured 1.3-2x on 1280x2048 .. 10240x1280 and 9216x3072).
GRAM_MIN_ASPECT = 1.5


def exact_svd(a: torch.Tensor, k_max: int | None = None) -> TruncatedSVD:
    """All singular values of ``a``, and the top ``k_max`` (default: all) singular vectors.

    Works on ``[m, n]`` or a stack ``[B, m, n]`` (one batched LAPACK/cuSOLVER call).
    Clearly non-square CPU matrices go through the float64 Gram matrix of their small side
    (exact to float32 precision for every singular value above ~1e-8 of the largest);
    everything else through LAPACK's thin SVD of the tall orientation.
    """
    m, n = a.shape[-2:]
    transposed = m < n
    tall = a.mT if transposed else a
    if a.dim() == 2 and a.device.type == "cpu" and max(m, n) >= GRAM_MIN_ASPECT * min(m, n):
        return _gram_svd(tall, k_max, transposed)
    # LAPACK's divide-and-conquer is much slower on wide matrices; factorize the transpose.
    u, s, vh = torch.linalg.svd(tall, full_matrices=False)
    return _split(u, s, vh, transposed)


def _gram_svd(tall: torch.Tensor, k_max: int | None, transposed: bool) -> TruncatedSVD:
    """SVD of a tall ``[M, N]`` matrix from the eigenvectors of its ``N x N`` Gram matrix."""
    t64 = tall.double()
    evals, evecs = torch.linalg.eigh(t64.mT @ t64)           # ascending
    del t64
    s = evals.flip(0).clamp_min(0).sqrt()
    k = s.numel() if k_max is None else min(k_max, s.numel())
    v = evecs.flip(1)[:, :k]
    # U = A V / S. A zero singular value (rank-deficient difference) gets a zero column, which
    # its zero weight cancels; float32 here keeps memory at one extra copy of the layer.
    vk = v.to(tall.dtype)
    sk = s[:k].to(tall.dtype)
    av = tall @ vk
    u = torch.where(sk > 0, av / sk.clamp_min(torch.finfo(tall.dtype).tiny), torch.zeros_like(av))
    return _split(u, s.to(tall.dtype), vk.mT, transposed)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(y, mode="reduced")
    return q


def sketch_width(shape: tuple[int, ...], k: int, oversample: int) -> int:
    """Columns of the Gaussian test matrix for the top-``k`` triplets of an ``m x n`` matrix."""
    return min(k + oversample, shape[-2], shape[-1])


def gaussian_sketch(shape: tuple[int, ...], width: int, generator: torch.Generator | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """The test matrix for one ``m x n`` matrix, drawn on the CPU so that results do not
    depend on the device or on which other layers share a batch."""
    m, n = shape[-2:]
    return torch.randn(min(m, n), width, generator=generator, dtype=dtype, device="cpu")


def randomized_svd_with(a: torch.Tensor, omega: torch.Tensor, k: int, niter: int) -> TruncatedSVD:
    """Top-``k`` triplets of ``a`` (``[m, n]`` or ``[B, m, n]``) from the test matrix ``omega``
    (``[min(m, n), width]``, or stacked ``[B, ...]``)."""
    m, n = a.shape[-2:]
    # Sketch the side that makes the tall QR factors the smaller ones.
    transposed = m < n
    mat = a.mT if transposed else a           # [..., M, N] with M >= N
    q = _orthonormal(mat @ omega.to(a.device))  # [..., M, width]
    for _ in range(niter):
        z = _orthonormal(mat.mT @ q)          # [..., N, width]
        q = _orthonormal(mat @ z)
    b = q.mT @ mat                            # [..., width, N], wide
    # LAPACK is slower on wide matrices (5-18% of a whole randomized SVD at 320..1280 wide
    # layers, measured): factorize b^T, which is tall, and swap its factors.
    vb, s, ubt = torch.linalg.svd(b.mT, full_matrices=False)
    u = q @ ubt.mT
    vh = vb.mT
    k = min(k, omega.shape[-1])
    return _split(u[..., :k], s[..., :k], vh[..., :k, :], transposed)


def randomized_svd(a: torch.Tensor, k: int, oversample: int, niter: int,
                   generator: torch.Generator | None = None) -> TruncatedSVD:
    """Top-``k`` triplets of ``a`` by a randomized range finder.

    ``oversample`` extra sketch columns and ``niter`` power iterations trade time for accuracy;
    the smallest returned singular values are the least accurate (they run low), which is why
    callers that choose a rank from them oversample past the rank cap.
    """
    width = sketch_width(tuple(a.shape), k, oversample)
    omega = gaussian_sketch(tuple(a.shape), width, generator, a.dtype)
    return randomized_svd_with(a, omega, k, niter)


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """All singular values, descending, from the smaller Gram matrix (cheaper than svdvals).

    Accumulated in float64: the Gram matrix squares the condition number, and float64 keeps
    the top values exact to float32 precision, which is all a rank rule needs.
    """
    m, n = a.shape
    small = a if m <= n else a.T
    g = gram_float64(small)
    ev = torch.linalg.eigvalsh(g).clamp_min_(0).sqrt_()
    return ev.flip(0).float()
