"""When the randomized SVD's power iterations may stop: the kept energy has converged.

Read by ``decompose._power_iterations`` after each iteration: the Ritz values of the current
subspace (the singular values of a small R factor) give the energy the kept components
capture; its gains shrink geometrically, and the test extrapolates what is still to come.
"""

from __future__ import annotations

import torch

# Power iterations stop once the energy the kept components capture has converged: when the
# gain still to come, extrapolated from the last two gains (they shrink geometrically), is
# below STOP_TOL of the energy left out. That keeps the error within ~STOP_TOL / 2 of what all
# ``niter`` iterations give. On DiT-like layers at rank 32 the error / optimum after 2, 3, 4 and
# 7 iterations measured 1.002-1.003, 1.0004-1.0009, 1.0001-1.0003 and 1.00001-1.00002; by those
# numbers the test stops after about 5 of 7 there; tests/extract/test_randomized_accuracy.py bounds it at 1.001x
# on constructed spectra. Below ENERGY_FLOOR of the total energy, float32 rounding of the
# estimates is of the order of the gains: the tolerance stops shrinking there.
STOP_TOL = 2e-4
ENERGY_FLOOR = 1e-3
MIN_ITERS = 2

# The kept-energy estimates of bfloat16 iterations wander by about 2.5e-4 of the kept energy
# from one iteration to the next (bfloat16 rounding of the basis and the products; measured on
# a clean low-rank change over a noise floor, where the true gains are smaller): gains below
# this share of it are unresolved. Float32 estimates resolve far below ENERGY_FLOOR.
ESTIMATE_RESOLUTION = {torch.bfloat16: 2.0 ** -11}


def ritz_values(r: torch.Tensor) -> torch.Tensor:
    """The Ritz values of the current subspace, descending, float64, per matrix.

    ``r`` is the R factor of ``A^T Q``: its singular values are those of ``Q^T A``, the
    Rayleigh-Ritz estimates of ``A``'s top singular values in the subspace ``Q``; computing
    them costs a ``width x width`` SVD, nothing next to the matmuls. Taken once per iteration
    and read by both ``kept_energy`` and ``gap_rate``.
    """
    return torch.linalg.svdvals(r.double())


def kept_energy(s: torch.Tensor, k: int) -> torch.Tensor:
    """Energy of the top ``k`` Ritz values ``s`` (``ritz_values``), float64, per matrix."""
    return (s[..., :k] ** 2).sum(-1)


# Subspace iteration turns the angle to the k-th singular direction by ``sigma_width / sigma_k``
# per half-step, so the kept energy's deficit falls by about the 4th power of that ratio per
# iteration. The Ritz values read it low early on, and a floor at the 4th power added one
# iteration on SDXL/DiT-like spectra (decay 0.985 plus noise; already at 1.0001-1.0002x the
# optimum there); at the 8th it keeps their counts (3-5 of 7) and still reads 0.3-0.9 past a
# gap into a flat noise floor, where the kept Ritz values are nearly equal.
GAP_RATE_POWER = 8


def gap_rate(s: torch.Tensor, k: int) -> torch.Tensor:
    """Per matrix: a least rate at which the kept energy's gains shrink per iteration, from
    the Ritz values ``s`` (``ritz_values``): ``(s_width / s_k) ** GAP_RATE_POWER``;
    0 when the subspace is no wider than ``k``.

    After a gap (a clean low-rank change kept past its rank) the kept components past the gap
    are noise directions of nearly equal singular values: their gains shrink slowly while the
    first gain (the change converging) is large, and the rate of the last two gains alone
    mistook that for convergence (error 1.0012-1.0034x the optimum after 2 iterations).
    """
    width = s.shape[-1]
    if width <= k:
        return torch.zeros(s.shape[:-1], dtype=torch.float64, device=s.device)
    ratio = s[..., width - 1] / s[..., k - 1].clamp_min(1e-300)
    return ratio.clamp(0, 1) ** GAP_RATE_POWER


def iterations_left(energies: list[torch.Tensor], fro2: torch.Tensor,
                    floor_rate: torch.Tensor | None = None) -> torch.Tensor:
    """Per matrix: about how many more iterations the stop test needs (inf where the gains do
    not shrink), from the last two gains and the least rate ``floor_rate`` as ``converged``
    extrapolates them. A slowly converging matrix is better served by a Rayleigh-Ritz step
    over its last bases together (``block_ritz``) than by those iterations."""
    if len(energies) < MIN_ITERS + 1:
        return torch.full_like(fro2, float("inf"))
    e0, e1, e2 = energies[-3:]
    d1, d2 = e1 - e0, e2 - e1
    rate = torch.where(d1 > 0, d2 / d1.clamp_min(1e-300), torch.zeros_like(d1)).clamp_min(0)
    if floor_rate is not None:
        rate = torch.maximum(rate, floor_rate.to(rate.device))
    left_out = torch.maximum(fro2 - e2, ENERGY_FLOOR * fro2)
    need = (STOP_TOL * left_out / d2.abs().clamp_min(1e-300)).clamp(max=1.0)
    steps = torch.log(need) / torch.log(rate.clamp(1e-300, 1 - 1e-12))
    return torch.where(rate < 1, steps.clamp_min(0), torch.full_like(steps, float("inf")))


def converged(energies: list[torch.Tensor], fro2: torch.Tensor, ahead: int = 0,
              floor_rate: torch.Tensor | None = None, resolution: float = 0.0) -> torch.Tensor:
    """Per matrix: whether the kept energy has converged (see STOP_TOL), from its history.

    ``ahead``: iterations that will run after the stop anyway (the float32 step that ends
    bfloat16 iterations); the gain they deliver is not counted as still to come.
    ``floor_rate``: the least rate at which gains shrink (``gap_rate``): the gains still to
    come are extrapolated at the larger of it and the rate of the last two gains.
    ``resolution``: the share of the kept energy below which a gain cannot be told from the
    estimates' rounding (``ESTIMATE_RESOLUTION``); such a gain counts as that large.
    """
    if len(energies) < MIN_ITERS + 1:
        return torch.zeros_like(fro2, dtype=torch.bool)
    e0, e1, e2 = energies[-3:]
    d1, d2 = e1 - e0, e2 - e1
    rate = torch.where(d1 > 0, d2 / d1.clamp_min(1e-300), torch.zeros_like(d1)).clamp_min(0)
    if floor_rate is not None:
        rate = torch.maximum(rate, floor_rate.to(rate.device))
    # A gain below 0 or below the resolution is rounding (bfloat16 products): what may still
    # come is as large as what the estimates cannot resolve, not 0. Gains that do not shrink
    # (rate >= 1) are never taken for convergence.
    gain = torch.maximum(d2.abs(), resolution * e2)
    still = torch.where(rate < 1, gain * rate ** (1 + ahead) / (1 - rate).clamp_min(1e-12),
                        torch.full_like(d2, float("inf")))
    left_out = torch.maximum(fro2 - e2, ENERGY_FLOOR * fro2)
    return still <= STOP_TOL * left_out
