"""The span the randomized SVD's Rayleigh-Ritz step reads: the last few bases of its power
iterations together, not the last one alone.

Consecutive bases of a subspace iteration differ in the directions still converging; their
joint span is a block Krylov space, which holds the top singular directions far better than
the last basis: measured at rank 32, width 48, on slowly decaying DiT-like layers (decay 0.995
plus noise), the error / optimum after 4 iterations was 1.0041 from the last basis, 1.0004
from the last two and 1.00007 from the last three, against 1.0005 after 8 iterations from the
last basis. The step then reads ``A^T Q`` for the wider ``Q`` (one product of ``3 x width``
columns, ~2.5x a power half-step) in place of reusing the last half-step's product, and the
iterations needed fall by half.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Bases read by the Rayleigh-Ritz step (the last RITZ_BLOCKS of the iterations).
RITZ_BLOCKS = 3

# ... and after the float32 step that ends bfloat16 iterations where their leak counts (a clean
# low-rank change kept past its rank): that step's basis and the last bfloat16 one. The float32
# basis holds the dominant directions to float32 precision; the earlier bases only help the
# noise-floor directions kept past the change's rank, whose choice barely moves the error: on
# the clean rank-16 pairs of ``benchmarks/peer_kinds.py`` (kind ``lowrank``) the worst error /
# optimum went from 1.00040 (three bases) to 1.00063, at 0.87x the decomposition time (the
# step's product is float32, 96 columns instead of 144).
RITZ_BLOCKS_AFTER_FLOAT32_STEP = 2

# Directions the earlier bases add to the last one are kept where their share (singular value
# of their part orthogonal to the last basis) is above this: below it they are float32 rounding
# of directions the bases agree on (a difference of two float32 bases is exact to ~6e-8).
NEW_DIRECTION_MIN = 1e-4


def block_span(bases: list[torch.Tensor]) -> torch.Tensor:
    """A basis (near-orthonormal: finish it with a Cholesky-QR) of the joint span of ``bases``
    (each ``[M, w]``, orthonormal, the last one the best): the last basis itself, then the
    directions the earlier ones add to it.

    The last basis is kept whole, so its span is exactly in the result (where it came from a
    float32 step after bfloat16 iterations, it corrects the earlier bases by ~1e-3 only, which
    a joint orthonormalization would drop as rounding). The earlier bases are projected off
    it (twice, for float32 accuracy) and their remaining span found from the eigenvectors of
    its Gram matrix (a few small GEMMs; Householder QR of ``M x 144`` cost twice as much).
    """
    last = bases[-1]
    if len(bases) == 1:
        return last
    rest = torch.cat(bases[:-1], dim=-1)
    for _ in range(2):
        rest = rest - last @ (last.mT @ rest)
    evals, evecs = torch.linalg.eigh((rest.mT @ rest).double())
    keep = evals > NEW_DIRECTION_MIN ** 2
    extra = rest @ (evecs[:, keep] * evals[keep].rsqrt()).to(rest.dtype)
    return torch.cat([last, extra], dim=-1)


def ritz_bases(histories: list[list[torch.Tensor]],
               orthonormal: Callable[[torch.Tensor], torch.Tensor],
               blocks: int = RITZ_BLOCKS) -> torch.Tensor:
    """The Rayleigh-Ritz bases of a stack: per matrix, the last ``blocks`` of its own
    bases (``histories[i]``, each ``[M, w]``) through ``block_span`` and ``orthonormal``;
    stacked ``[B, M, width]``, zero columns padding the narrower ones (a zero column adds a
    zero singular value, which the top ``k`` never reach). Each matrix so gets the span it gets
    when decomposed alone, however long the others iterate."""
    return pad_stack([orthonormal(block_span(h[-blocks:])) for h in histories])


def pad_stack(blocks: list[torch.Tensor]) -> torch.Tensor:
    """``[..., w_i]`` blocks stacked, zero columns padding each to the widest."""
    width = max(b.shape[-1] for b in blocks)
    return torch.stack([torch.nn.functional.pad(b, (0, width - b.shape[-1])) for b in blocks])
