"""Batched extraction: same-shaped weight differences decomposed in one SVD call.

A batched LAPACK/cuSOLVER call on ``[B, m, n]`` replaces B separate launches. On a GPU that is
where batching pays (small and medium layers leave most of the device idle one at a time); on a
CPU MKL already uses every core for one matrix, so batching gains nothing there (measured
0.92-1.15x on DiT-sized layers) and callers keep it off.

Every step mirrors the per-layer path in ``layer.py`` / ``decompose.py`` / ``exact_svd.py`` (same orientation,
same per-layer seeded sketch, same rank rules, clamp and scaling through
``layer.finish_extraction``), so a layer gets the same rank and the same factors, within float
rounding, whether it was extracted alone or in a batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from .config import ExtractConfig
from .decompose import gaussian_sketch, randomized_svd_with, sketch_width
from .exact_svd import exact_svd
from .layer import LayerExtraction, choose_rank, finish_extraction, svd_plan
from .truncated_svd import TruncatedSVD


def _unstack(svd: TruncatedSVD) -> list[TruncatedSVD]:
    return [replace(svd, U=svd.U[i], S=svd.S[i], Vh=svd.Vh[i]) for i in range(svd.S.shape[0])]


def batched_exact_svd(stack: torch.Tensor) -> list[TruncatedSVD]:
    """Thin SVD of each ``[m, n]`` matrix of ``stack`` ``[B, m, n]``, on the tall orientation."""
    return _unstack(exact_svd(stack))


def batched_randomized_svd(stack: torch.Tensor, k: int, oversample: int, niter: int,
                           generators: Sequence[torch.Generator | None],
                           fro2s: Sequence[float] | None = None) -> list[TruncatedSVD]:
    """Top-``k`` triplets of each matrix of ``stack``, as ``decompose.randomized_svd`` computes them.

    Each matrix gets its own Gaussian sketch from its own generator, so the result does not
    depend on which layers share the batch.
    """
    shape = tuple(stack.shape[-2:])
    width = sketch_width(shape, k, oversample)
    omega = torch.stack([gaussian_sketch(shape, width, g, stack.dtype) for g in generators])
    fro2 = None if fro2s is None else torch.tensor(list(fro2s), dtype=torch.float64)
    return _unstack(randomized_svd_with(stack, omega, k, niter, fro2=fro2))


def same_shape_groups(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Indices grouped by identical shape, groups in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    return list(groups.values())


def extract_matrices(diffs: Sequence[torch.Tensor], cfg: ExtractConfig, fros: Sequence[float],
                     generators: Sequence[torch.Generator | None]) -> list[LayerExtraction]:
    """``layer.extract_matrix`` for several differences; same-shaped ones share one SVD call.

    The differences are consumed (overwritten with their residuals), like ``extract_matrix``.
    Results come back in input order.
    """
    results: list[LayerExtraction | None] = [None] * len(diffs)
    for group in same_shape_groups([tuple(d.shape) for d in diffs]):
        t0 = time.perf_counter()
        mats = [diffs[i].reshape(diffs[i].shape[0], -1) for i in group]
        m, n = mats[0].shape
        cap = cfg.rank_cap(diffs[group[0]].dim())
        use_exact, k = svd_plan(m, n, cfg, cap)
        # The stack is a copy: the per-layer residuals below overwrite ``diffs`` in place.
        stack = torch.stack(mats)
        if use_exact:
            svds = batched_exact_svd(stack)
        else:
            svds = batched_randomized_svd(stack, k, cfg.oversample, cfg.lowrank_iters,
                                          [generators[i] for i in group],
                                          [fros[i] * fros[i] for i in group])
        del stack
        # The batch's time is shared out evenly: per-layer seconds stay comparable with V1.
        share = (time.perf_counter() - t0) / len(group)
        for i, mat, svd in zip(group, mats, svds, strict=True):
            t_layer = time.perf_counter() - share
            rank = choose_rank(mat, svd, use_exact, cfg, cap, fros[i] * fros[i])
            results[i] = finish_extraction(diffs[i], svd, rank, fros[i], cfg, t_layer)
    return [r for r in results if r is not None]
