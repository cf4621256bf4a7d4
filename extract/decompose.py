"""Randomized truncated SVD of a weight difference (Halko et al.); the exact one is in
``exact_svd``.

Both return the top singular triplets of a 2-D float32 matrix. The randomized
path sketches with a Gaussian test matrix, runs power iterations with re-orthonormalization
each half-step (without it the sketch collapses onto the top singular vector in float32), and
finishes with the SVD of the small projected matrix (the Rayleigh-Ritz step, from its float64
Gram matrix), projected once more in float32 where that matrix was a bfloat16 product, so that
the returned singular values are exact for the returned vectors. On the CPU
the half-steps are normalised by Cholesky-QR (one Gram matmul, one tiny Cholesky, one
triangular solve; Householder QR only where its pivots say it is unsafe); the iterations stop as
soon as the kept spectrum has converged, and their big matmuls run in bfloat16 where the CPU
has bfloat16 instructions, with one float32 iteration and a float32 Rayleigh-Ritz product
where the difference keeps so much of its energy that bfloat16 rounding would count
(``_bf16_leak_matters``). On CUDA they run in bfloat16 on the tensor cores and the
Rayleigh-Ritz product in float32 (see ``power_dtype``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

from .block_ritz import RITZ_BLOCKS, RITZ_BLOCKS_AFTER_FLOAT32_STEP, block_span, pad_stack, ritz_bases
from .cholesky_qr import cholesky_qr, inverse_upper, orthonormal
from .difference_pool import scratch
from .exact_svd import gram_svd
from .low_precision_products import product as _product
from .low_precision_products import product_t as _product_t
from .power_stop import (
    ESTIMATE_RESOLUTION,
    converged,
    gap_rate,
    iterations_left,
    kept_energy,
    ritz_values,
)
from .truncated_svd import TruncatedSVD, split_transposed


def sketch_width(shape: tuple[int, ...], k: int, oversample: int) -> int:
    """Columns of the Gaussian test matrix for the top-``k`` triplets of an ``m x n`` matrix."""
    return min(k + oversample, shape[-2], shape[-1])


def gaussian_sketch(shape: tuple[int, ...], width: int, generator: torch.Generator | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """The test matrix for one ``m x n`` matrix, drawn on the CPU so that results do not
    depend on the device or on which other layers share a batch."""
    m, n = shape[-2:]
    return torch.randn(min(m, n), width, generator=generator, dtype=dtype, device="cpu")


# The energy a bfloat16 basis misses, as a share of the energy it keeps. Measured at rank 32
# on 9216x3072 and 1280x11520 layers without the float32 step: the error / optimum rose by
# about 1.6e-6 x (kept / left-out energy), i.e. a squared-error share of ~2^-18 (1.000018 ->
# 1.000039 at kept / left 6-11, 1.00037 -> 1.00137 at 230-560: clean low-rank changes over a
# noise floor). The float32 step runs when the leak, counted at 4x that share, could add more
# than BF16_LEAK_TOL of the optimal squared error (kept / left-out above ~6.5); elsewhere the
# basis of the bfloat16 iterations goes to the Rayleigh-Ritz step as it is (one float32
# product, which that step needs anyway), 10-15% of a layer's SVD less.
BF16_LEAK_SHARE = 2.0 ** -16
BF16_LEAK_TOL = 1e-4


# Iterations after which a matrix the stop test expects to need more than BLOCK_IF_MORE_THAN
# further iterations stops and takes the block Rayleigh-Ritz step (``block_ritz``): measured on
# slowly decaying layers (decay 0.995 plus noise, rank 32), 4 iterations and the last three
# bases together gave 1.00009x the optimum, against 1.0007x after all 8 from the last basis,
# at ~0.75x the time; layers that converge within two more iterations (SDXL-like spectra) keep
# iterating, for which the wider step costs more than it saves.
BLOCK_AFTER = 5
BLOCK_IF_MORE_THAN = 2.0


def _bf16_leak_matters(energies: list[torch.Tensor], fro2: torch.Tensor) -> bool:
    """Whether any matrix keeps so much of its energy that the bfloat16 basis's leak counts."""
    if not energies:
        return True
    kept = energies[-1].to(fro2.device)
    left_out = (fro2 - kept).clamp_min(0)
    return bool((BF16_LEAK_SHARE * kept > BF16_LEAK_TOL * left_out).any())


def _power_iterations(mat: torch.Tensor, omega: torch.Tensor, k: int, niter: int,
                      fro2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Subspace iteration from the sketch ``mat @ omega`` until converged or ``niter``;
    returns an orthonormal
    ``q`` and ``y = mat^T q`` in float32 (the projected matrix, transposed, for the
    Rayleigh-Ritz step), and whether ``y`` is a float32 product (its Ritz values exact).

    The big matmuls run in ``dtype`` (float32, or bfloat16 where the CPU has bfloat16
    instructions: 3-4x the float32 rate); the bases stay float32 and the convergence test reads
    float64 estimates. Normalisation by Cholesky-QR each half-step, one Householder QR at the
    end. In a stack each matrix stops on its own (its ``q`` is frozen once converged), so a
    layer gets the same iterations whether it is decomposed alone or in a batch.
    """
    if dtype == mat.dtype:
        return _iterate(mat, mat, omega, k, niter, fro2, dtype)
    # The low-precision copy keeps the layout of the stored matrix (a wide layer is iterated
    # as its transpose view), in a reused buffer where the layer loop has a pool.
    flipped = not mat.is_contiguous() and mat.mT.is_contiguous()
    stored = mat.mT if flipped else mat
    with scratch(stored, dtype) as low:
        low.copy_(stored)
        return _iterate(mat, low.mT if flipped else low, omega, k, niter, fro2, dtype)


def _iterate(mat: torch.Tensor, low: torch.Tensor, omega: torch.Tensor, k: int, niter: int,
             fro2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The body of ``_power_iterations``; ``low`` is ``mat`` in ``dtype``."""
    batch = mat.shape[:-2]
    done = torch.zeros(batch, dtype=torch.bool, device=fro2.device)
    blocked = torch.zeros_like(done)
    energies: list[torch.Tensor] = []
    q, _ = cholesky_qr(_product(low, omega), precise=False)   # [..., M, width]
    # Each matrix's own bases, for the Rayleigh-Ritz step (``block_ritz``).
    histories = [[x] for x in q.reshape(-1, *q.shape[-2:])]
    y = _product_t(low, q)
    for i in range(niter):
        z, r = cholesky_qr(y, precise=False)
        ritz = ritz_values(r)
        energies.append(kept_energy(ritz, k).to(fro2.device))
        # With bfloat16 products a float32 iteration follows where their leak counts: the stop
        # test counts on it as one still to come, and it is the last of the ``niter``.
        ahead = int(dtype != mat.dtype and _bf16_leak_matters(energies, fro2))
        floor = gap_rate(ritz, k).to(fro2.device)
        done = done | converged(energies, fro2, ahead, floor, ESTIMATE_RESOLUTION.get(dtype, 0.0))
        if i + 1 >= BLOCK_AFTER:
            # Slow to converge: a matrix stops here and its Rayleigh-Ritz step reads its last
            # bases together (``block_ritz``).
            slow = ~done & (iterations_left(energies, fro2, floor) > BLOCK_IF_MORE_THAN)
            blocked, done = blocked | slow, done | slow
        if bool(done.all()) or (ahead and i == niter - 1):
            break
        q_next, _ = cholesky_qr(_product(low, z), precise=False)
        y_next = _product_t(low, q_next)
        if batch:
            keep = done.to(q.device).view(*batch, 1, 1)
            q, y = torch.where(keep, q, q_next), torch.where(keep, y, y_next)
        else:
            q, y = q_next, y_next
        frozen = done.reshape(-1).tolist()
        for history, x, stopped in zip(histories, q.reshape(-1, *q.shape[-2:]), frozen, strict=True):
            if not stopped:
                history.append(x)
    exact_product = dtype == mat.dtype
    blocks = RITZ_BLOCKS
    if not exact_product and _bf16_leak_matters(energies, fro2):
        # One more iteration in float32. bfloat16 products leave the bases within ~1e-3 of
        # the dominant subspace: harmless where the left-out energy dwarfs that, but a clean
        # low-rank difference kept past its rank leaves out so little that the leak alone
        # measured 1.018x the optimum. One float32 step shrinks the leak by
        # (sigma_width / sigma_k)^2; the Rayleigh-Ritz step then reads the float32 matrix.
        z, _ = cholesky_qr(y)
        q, _ = cholesky_qr(mat @ z)
        for history, x in zip(histories, q.reshape(-1, *q.shape[-2:]), strict=True):
            history.append(x)
        exact_product = True
        blocks = RITZ_BLOCKS_AFTER_FLOAT32_STEP
    # Converged matrices: the last basis alone is as good, and the Rayleigh-Ritz step takes the
    # last bfloat16 product as it is (q = Q R, mat^T Q = y R^-1: no new matmul; q came out of a
    # Cholesky-QR, so R is within rounding of the identity). The others (stopped as slow, not
    # converged within ``niter``, or after a float32 step): the last ``blocks`` bases together
    # (``block_ritz``), made orthonormal to float32 precision by a Cholesky-QR on a float64
    # Gram matrix, and a new product. Where the leak does not count that product stays in
    # bfloat16: its rounding adds a random error whose energy is ~2^-18 w / M of ||A||^2
    # (1.5e-8 of it at w = 48, M = 12288), next to a left-out energy of at least 1/7.5 of
    # ||A||^2 there: the error moves by < 1e-7.
    plain = [not exact_product and bool(x) for x in (done & ~blocked).reshape(-1).tolist()]
    if all(plain):
        q_orth, r_final = cholesky_qr(q)
        return q_orth, y @ inverse_upper(r_final).to(y.dtype), exact_product
    if not batch or not any(plain):
        q_orth = _ritz_basis(histories, batch, lambda b: cholesky_qr(b)[0], blocks)
        return q_orth, (mat.mT @ q_orth if exact_product else _product_t(low, q_orth)), exact_product
    # A stack with both kinds: each matrix as it goes alone, zero columns padding the narrower.
    pieces = []
    for j, (history, is_plain) in enumerate(zip(histories, plain, strict=True)):
        a, a_low = mat.reshape(-1, *mat.shape[-2:])[j], low.reshape(-1, *low.shape[-2:])[j]
        if is_plain:
            q_j, r_j = cholesky_qr(history[-1])
            y_j = y.reshape(-1, *y.shape[-2:])[j] @ inverse_upper(r_j).to(y.dtype)
        else:
            q_j, _ = cholesky_qr(block_span(history[-blocks:]))
            y_j = a.mT @ q_j if exact_product else _product_t(a_low, q_j)
        pieces.append((q_j, y_j))
    q_orth = pad_stack([q_j for q_j, _ in pieces])
    y = pad_stack([y_j for _, y_j in pieces])
    return (q_orth.reshape(*batch, *q_orth.shape[-2:]), y.reshape(*batch, *y.shape[-2:]),
            exact_product)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX-BF16).

    There bfloat16 matmuls run at 3-4x the float32 rate (measured 840 vs 190 GFLOP/s on 2
    cores); without those instructions bfloat16 is emulated and slower than float32, so the
    iterations stay float32. Read from ``/proc/cpuinfo`` (Linux); elsewhere assumed absent.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False
    return False


# Below this many elements per matrix the CPU keeps float32 products. Measured on 2026-12-07
# (after the float32-Gram Cholesky-QR and the (q^T A)^T products), bfloat16 wins at every SDXL
# size too (1280x1280 15 vs 28 ms per layer, 640x640 9 vs 18, same error to 6 digits): 0. The
# earlier measurement (when float32 won below 2M elements) was:
# SDXL-like layer (rank 32), bf16 against float32 iterations: 1280x1280 63 vs 34 ms, 640x640
# 16 vs 14, 320x2880 22 vs 22; from 1280x2048 (2.6M) on bf16 wins (30 vs 39 ms; 1280x5120
# 55 vs 80).
CPU_BF16_MIN_ELEMENTS = 0


def power_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the power iterations' big matmuls on ``device``.

    bfloat16 on CUDA (tensor cores) and on CPUs with bfloat16 instructions
    (``cpu_has_bf16_matmul``); float32 elsewhere. The Rayleigh-Ritz step reads the float32
    matrix on CUDA, and on the CPU where the difference keeps most of its energy
    (``_bf16_leak_matters``); tests/extract/test_randomized_accuracy.py bounds both routes at
    1.001x the optimum on constructed spectra.
    """
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matmul()):
        return torch.bfloat16
    return torch.float32


def _low_precision_iterations(mat: torch.Tensor, q: torch.Tensor, niter: int,
                              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``niter`` power iterations with the matmuls in ``dtype`` (QRs in float32), then one
    float32 ``y = mat^T q`` for the Rayleigh-Ritz step."""
    low = mat.to(dtype)
    histories = [[x] for x in q.reshape(-1, *q.shape[-2:])]
    for _ in range(niter):
        z = orthonormal((low.mT @ q.to(dtype)).float())
        q = orthonormal((low @ z.to(dtype)).float())
        for history, x in zip(histories, q.reshape(-1, *q.shape[-2:]), strict=True):
            history.append(x)
    del low
    q = _ritz_basis(histories, mat.shape[:-2], orthonormal)   # the last bases together
    return q, mat.mT @ q


def _ritz_basis(histories: list[list[torch.Tensor]], batch: torch.Size,
                orthonormal: Callable[[torch.Tensor], torch.Tensor],
                blocks: int = RITZ_BLOCKS) -> torch.Tensor:
    """The Rayleigh-Ritz basis from each matrix's last ``blocks`` bases (``block_ritz``),
    shaped as the stack."""
    if not batch:
        return orthonormal(block_span(histories[0][-blocks:]))
    q = ritz_bases(histories, orthonormal, blocks)
    return q.reshape(*batch, *q.shape[-2:])


def randomized_svd_with(a: torch.Tensor, omega: torch.Tensor, k: int, niter: int, *,
                        fro2: float | torch.Tensor | None = None,
                        iteration_dtype: torch.dtype | None = None) -> TruncatedSVD:
    """Top-``k`` triplets of ``a`` (``[m, n]`` or ``[B, m, n]``) from the test matrix ``omega``
    (``[min(m, n), width]``, or stacked ``[B, ...]``).

    ``fro2``: ``||a||_F^2`` (per matrix) if the caller has it, for the convergence test.
    ``iteration_dtype``: the power iterations' matmul dtype (default: ``power_dtype``).
    """
    m, n = a.shape[-2:]
    # Sketch the side that makes the tall QR factors the smaller ones.
    transposed = m < n
    mat = a.mT if transposed else a           # [..., M, N] with M >= N
    k = min(k, omega.shape[-1])
    dtype = iteration_dtype or power_dtype(a.device)
    if iteration_dtype is None and a.device.type == "cpu" and m * n < CPU_BF16_MIN_ELEMENTS:
        dtype = a.dtype
    if a.device.type != "cpu" and dtype != mat.dtype:
        # CUDA: all ``niter`` bfloat16 iterations, no per-iteration host sync.
        q = orthonormal((mat.to(dtype) @ omega.to(a.device, dtype)).float())
        q, y = _low_precision_iterations(mat, q, niter, dtype)
        exact = True                            # its last product is float32
    else:
        if fro2 is None:
            fro2 = torch.linalg.vector_norm(mat, dim=(-2, -1), dtype=torch.float64) ** 2
        f2 = torch.as_tensor(fro2, dtype=torch.float64).to("cpu")
        q, y, exact = _power_iterations(mat, omega.to(a.device, mat.dtype), k, niter, f2, dtype)
    # y = (q^T mat)^T = vb S ubt: its top k from the float64 Gram matrix of its few columns
    # (``gram_svd``: 2.85 vs 7.1 ms for LAPACK's SVD at 3072x144, 0.56 vs 1.24 at 3072x48;
    # values within 6e-8 of LAPACK's), then A ~= (q ubt^T) S vb^T.
    top = gram_svd(y, k, False)
    u = q @ top.Vh.mT
    if not exact:
        return split_transposed(*_float32_projection(mat, u), transposed)
    return split_transposed(u, top.S[..., :k], top.U.mT, transposed)


def _float32_projection(mat: torch.Tensor, u: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The truncated SVD of ``mat`` projected onto the orthonormal columns ``u`` (the top
    Ritz vectors of a bfloat16 Rayleigh-Ritz step), from one float32 product ``mat^T u``.

    The bfloat16 product's rounding moves the Ritz values by up to ~1e-3 of themselves on small
    noisy layers (a 768x96 layer at rank 4: its error read from them was 0.17% low, below the
    optimum), while their vectors stay optimal to ~1e-5. Projecting in float32 makes the values
    exact for the kept subspace, so the layer's error is ||dW||^2 - kept energy with no
    residual to measure: one product of ``k`` columns costs 0.3-0.5x the residual's product
    and pass over the layer (measured on SDXL-sized layers at rank 32).
    """
    vb, s, ubt = torch.linalg.svd(mat.mT @ u, full_matrices=False)
    return u @ ubt.mT, s, vb.mT


def randomized_svd(a: torch.Tensor, k: int, oversample: int, niter: int,
                   generator: torch.Generator | None = None, *,
                   fro2: float | torch.Tensor | None = None) -> TruncatedSVD:
    """Top-``k`` triplets of ``a`` by a randomized range finder.

    ``oversample`` extra sketch columns and ``niter`` power iterations trade time for accuracy;
    the smallest returned singular values are the least accurate (they run low), which is why
    callers that choose a rank from them oversample past the rank cap. ``niter`` is the most
    iterations: in float32 they stop once the kept spectrum has converged (``power_stop.STOP_TOL``).
    """
    width = sketch_width(tuple(a.shape), k, oversample)
    omega = gaussian_sketch(tuple(a.shape), width, generator, a.dtype)
    return randomized_svd_with(a, omega, k, niter, fro2=fro2)
