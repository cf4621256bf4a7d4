"""The exact truncated SVD of a weight difference (LAPACK, or the eigenvectors of a float64 Gram
matrix), and all singular values of one for the rank rules.

The exact path never asks for full matrices and always factorizes the tall orientation, which
is what makes it several times faster than ``torch.linalg.svd(W)`` on the wide/tall layers of
diffusion models. ``gram_svd`` also finishes the randomized route's Rayleigh-Ritz step.
"""

from __future__ import annotations

import torch

from .norms import gram_float64
from .partial_eigh import top_eigenvectors
from .truncated_svd import TruncatedSVD, split_transposed

# Above this aspect ratio a float64 Gram eigendecomposition of the small side beats LAPACK's
# thin SVD on the CPU (measured 1.3-2x on 1280x2048 .. 10240x1280 and 9216x3072).
GRAM_MIN_ASPECT = 1.5


def exact_route(device: torch.device, m: int, n: int, batched: bool, k_max: int | None = None) -> str:
    """``"gram64"`` (float64 Gram matrix of the small side + eigh) or ``"thin_svd"``.

    CPU: measured (see GRAM_MIN_ASPECT); square layers too when only a few singular vectors
    are wanted (``k_max``), which the partial eigensolver finds at a fraction of eigh's cost
    (``partial_eigh_pays``). CUDA: the Gram route for every shape, not measured
    yet: cuSOLVER's SVD of a large matrix was measured no faster than the full SVD per layer
    (21.8 s vs 20.5 s on an H200, issue "Fastest on the GPU"), while the Gram route is one
    matmul and one small symmetric eigensolve (batched for stacks). ``benchmarks/gpu_peers.py``
    times both routes (``route_*`` rows) on the device; set this from its numbers.
    """
    if device.type == "cuda":
        return "gram64"
    if device.type == "cpu" and not batched and max(m, n) >= GRAM_MIN_ASPECT * min(m, n):
        return "gram64"
    small = min(m, n)
    if k_max is not None and partial_eigh_pays(device, 3 if batched else 2, min(k_max, small), small):
        return "gram64"
    return "thin_svd"


def exact_svd(a: torch.Tensor, k_max: int | None = None) -> TruncatedSVD:
    """All singular values of ``a``, and the top ``k_max`` (default: all) singular vectors.

    Works on ``[m, n]`` or a stack ``[B, m, n]`` (one batched call). The route per device and
    shape is ``exact_route``'s: the float64 Gram matrix of the small side (exact to float32
    precision for every singular value above ~1e-8 of the largest) or the thin SVD of the
    tall orientation.
    """
    m, n = a.shape[-2:]
    transposed = m < n
    tall = a.mT if transposed else a
    if exact_route(a.device, m, n, a.dim() > 2, k_max) == "gram64":
        return gram_svd(tall, k_max, transposed)
    # LAPACK's divide-and-conquer is much slower on wide matrices; factorize the transpose.
    u, s, vh = torch.linalg.svd(tall, full_matrices=False)
    return split_transposed(u, s, vh, transposed)


# The partial eigensolver (eigenvalues, then the top k vectors by a filtered subspace iteration)
# in place of a full eigh, on the CPU, for k up to this share of n: on 3072x3072 Gram matrices
# eigvalsh costs ~1.0 s of eigh's ~3.7 s and the filter ~0.1-0.5 s for k = 32.
PARTIAL_EIGH_MAX_SHARE = 0.25


def partial_eigh_pays(device: torch.device, dims: int, k: int, n: int) -> bool:
    """Whether the top ``k`` of ``n`` eigenvectors come from ``top_eigenvectors``."""
    return device.type == "cpu" and dims == 2 and n >= 256 and k <= PARTIAL_EIGH_MAX_SHARE * n


def gram_svd(tall: torch.Tensor, k_max: int | None, transposed: bool) -> TruncatedSVD:
    """SVD of a tall ``[..., M, N]`` matrix from the eigenvectors of its ``N x N`` Gram matrix."""
    if tall.dim() == 2:
        # Row blocks upcast one at a time: a float64 copy of the whole layer (twice its float32
        # size) was the exact path's memory peak (1021 MiB on two 2.6 GiB models).
        gram = gram_float64(tall.mT)
    else:
        t64 = tall.double()
        gram = t64.mT @ t64
        del t64
    n = gram.shape[-1]
    k = n if k_max is None else min(k_max, n)
    v = None
    if partial_eigh_pays(gram.device, gram.dim(), k, n):
        evals = torch.linalg.eigvalsh(gram).flip(-1)          # descending, no vectors
        v = top_eigenvectors(gram, evals, k)
    if v is None:
        evals, evecs = torch.linalg.eigh(gram)
        evals, v = evals.flip(-1), evecs.flip(-1)[..., :k]
    del gram
    s = evals.clamp_min(0).sqrt()
    # U = A V / S. A zero singular value (rank-deficient difference) gets a zero column, which
    # its zero weight cancels; float32 here keeps memory at one extra copy of the layer.
    vk = v.to(tall.dtype)
    sk = s[..., :k].to(tall.dtype).unsqueeze(-2)
    av = tall @ vk
    u = torch.where(sk > 0, av / sk.clamp_min(torch.finfo(tall.dtype).tiny), torch.zeros_like(av))
    return split_transposed(u, s.to(tall.dtype), vk.mT, transposed)


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
