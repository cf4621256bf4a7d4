"""The top eigenvectors of a symmetric positive semi-definite matrix whose eigenvalues are known.

The exact path factorizes a layer through its float64 Gram matrix ``G`` (``n x n``). LAPACK's
``eigh`` computes all ``n`` eigenvectors; a LoRA needs the top ``k`` (``k`` 32 of 3072). Its
eigenvalues alone (``eigvalsh``: the tridiagonal reduction, no vectors) cost about a third of
``eigh`` on the CPU, and once they are known the top ``k`` eigenvectors come cheaply from a
subspace iteration whose polynomial is chosen from them: a Chebyshev filter that damps
``[lambda_min, lambda_w]`` (the eigenvalues below a subspace of ``w`` columns) and grows
everything above it, of the degree that the gap between ``lambda_k`` and ``lambda_w`` needs.
Each step is one ``n x n`` by ``n x w`` float64 product.

The result is checked, not trusted: every leading block of ``r <= k`` Ritz vectors must capture
the energy of the true top ``r`` eigenvalues to within ``ENERGY_TOL`` of the optimal error at that
rank (``sum_{i<r} lambda_i - theta_i <= tol * sum_{i>=r} lambda_i``), so the truncated
factorization at every rank is the optimal one to ``sqrt(1 + tol)``. When the spectrum gives the
filter nothing to work with (no gap below ``k``) or the check fails, the caller falls back to
the full ``eigh``.
"""

from __future__ import annotations

import math

import torch

# Allowed shortfall of captured energy, relative to the optimal squared error at each rank:
# the error is then within sqrt(1 + 1e-6) = 1 + 5e-7 of the optimum, the resolution of the
# float32 factors the LoRA stores (float32 eps is 1.2e-7).
ENERGY_TOL = 1e-6

# Amplification of the k-th eigenvector over the damped ones that the filter aims for: the
# residual angle after the filter is about its inverse (1e-10), its energy share the square.
TARGET_AMPLIFICATION = 1e10

# One filter block grows the top eigenvector over the k-th by at most this much before the
# basis is re-orthonormalized: float64 keeps 16 digits, so 1e8 leaves 8 for the k-th direction.
BLOCK_RANGE = 1e8

# Above this total degree a full eigh is cheaper (each degree is 2 n^2 w flops; eigh ~ 9 n^3).
MAX_DEGREE = 200

# At most this many degrees between two checks: the check (one more product and a small eigh)
# often passes well before the planned degree, which assumes every vector must converge.
MAX_BLOCK = 8


def _growth(t: float) -> float:
    """``log`` of the per-degree growth of a Chebyshev polynomial at ``t >= 1``."""
    return math.log(t + math.sqrt(max(t * t - 1.0, 0.0)))


def _plan(evals: list[float], k: int, n: int) -> tuple[int, int, float, float] | None:
    """The cheapest subspace width ``w`` and the filter degree it needs, or None (no gap).

    ``evals`` descending. Returns ``(w, degree, center, half_width)`` of the damped interval.
    """
    best = None
    low = evals[-1]
    for w in sorted({k + 8, k + 16, k + 32, 2 * k, 3 * k, 4 * k}):
        if w >= n:
            continue
        high = evals[w]
        half = (high - low) / 2
        if half <= 0:   # a flat floor below w: (G - floor) removes it in one step
            return w, 1, low, evals[0]
        # Wanted eigenvalues equal to lambda_w (a flat floor reaching into the top k) need no
        # separating: any vectors of that floor serve as well. The filter aims at the last
        # wanted eigenvalue above it.
        above = sum(1 for v in evals[:k] if v > high * (1 + 1e-9))
        if above == 0:
            return w, 1, (high + low) / 2, max(half, 1e-300)
        t = (evals[above - 1] - (high + low) / 2) / half
        if t <= 1.0 + 1e-9:
            continue
        degree = math.ceil(math.log(2 * TARGET_AMPLIFICATION) / _growth(t))
        # Cost in n^2 units: the filter's products, plus the QR and Rayleigh-Ritz (~6 n w^2 / n^2
        # is small; counted as a few extra products).
        cost = w * (degree + 3)
        if degree <= MAX_DEGREE and (best is None or cost < best[0]):
            best = (cost, w, degree, (high + low) / 2, half)
    return None if best is None else best[1:]


def _filter_block(op, y: torch.Tensor, degree: int, center: float, half: float) -> torch.Tensor:
    """``T_degree((op - center) / half) @ y``, rescaled as it goes (the growth may pass 1e300)."""
    prev = y
    cur = (op(y) - center * y) / half
    for _ in range(degree - 1):
        nxt = 2.0 * (op(cur) - center * cur) / half - prev
        scale = nxt.abs().amax().clamp_min(1e-300)
        prev, cur = cur / scale, nxt / scale   # a common scale keeps the recurrence exact
    return cur


def _block_degree(top: float, kth: float, center: float, half: float, left: int) -> int:
    """The largest degree per block that grows ``top`` over ``kth`` by at most BLOCK_RANGE."""
    spread = _growth(max((top - center) / half, 1.0)) - _growth(max((kth - center) / half, 1.0))
    if spread <= 0:
        return min(left, MAX_BLOCK)
    return max(1, min(left, MAX_BLOCK, int(math.log(BLOCK_RANGE) / spread)))


def captures_top_energy(evals: torch.Tensor, ritz: torch.Tensor, k: int,
                        tol: float = ENERGY_TOL) -> bool:
    """Whether every leading ``r <= k`` Ritz values hold the top-``r`` energy to ``tol``.

    ``evals`` all eigenvalues descending, ``ritz`` the Ritz values descending (float64). The
    floor allows float64 rounding of sums as large as ``lambda_1 * k``.
    """
    deficit = torch.cumsum(evals[:k] - ritz[:k], 0)
    tails = torch.flip(torch.cumsum(torch.flip(evals, (0,)), 0), (0,))[:k]  # sum_{i>=r}
    floor = 64 * torch.finfo(torch.float64).eps * float(evals[0]) * k
    return bool((deficit <= tol * tails + floor).all())


class _Deflated:
    """``G`` with its locked eigenpairs removed: ``G x - V diag(theta) V^T x``.

    The strong leading eigenvalues of a difference converge in a step or two; removing them
    keeps the filter's growth range (and so the re-orthonormalizations) set by the rest.
    """

    def __init__(self, g: torch.Tensor) -> None:
        self.g = g
        self.v = g.new_zeros(g.shape[0], 0)
        self.theta = g.new_zeros(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.g @ x
        if self.v.shape[1]:
            out -= self.v @ (self.theta.unsqueeze(1) * (self.v.mT @ x))
        return out

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        return y - self.v @ (self.v.mT @ y) if self.v.shape[1] else y

    def lock(self, v: torch.Tensor, theta: torch.Tensor) -> None:
        self.v = torch.cat([self.v, v], 1)
        self.theta = torch.cat([self.theta, theta])


def top_eigenvectors(g: torch.Tensor, evals: torch.Tensor, k: int,
                     generator_seed: int = 0) -> torch.Tensor | None:
    """The top ``k`` eigenvectors ``[n, k]`` of float64 PSD ``g``, or None where eigh is the way.

    ``evals``: all eigenvalues of ``g``, descending, float64. Deterministic for a given input.
    """
    n = g.shape[-1]
    if g.dim() != 2 or k <= 0 or k >= n:
        return None
    evals = evals.clamp_min(0)
    values = [float(v) for v in evals.tolist()]
    if values[0] <= 0:   # the zero matrix: every basis is an eigenbasis, eigh gives one
        return None
    plan = _plan(values, k, n)
    if plan is None:
        return None
    w, degree, center, half = plan
    op = _Deflated(g)
    gen = torch.Generator(device=g.device).manual_seed(generator_seed)
    y, _ = torch.linalg.qr(torch.randn(n, w, dtype=g.dtype, device=g.device, generator=gen))
    done = 0
    # Locked vectors are removed from the operator and never revisited. A residual rho costs at
    # most rho of captured energy (an angle rho / gap to a neighbour gap apart costs
    # min(gap, rho^2 / gap) <= rho), so locking asks rho below a tenth of the energy the check
    # allows per vector; and what a locked vector's error leaves in the operator (a coupling of
    # size rho) must sit inside the damped interval, or the filter would grow it again.
    least_tail = float(evals[k - 1:].sum())
    lock_residual = min(0.1 * half, 0.1 * ENERGY_TOL * least_tail / k)
    while done < 2 * degree:   # the planned degree, and as much again before giving up
        nl = op.v.shape[1]
        step = _block_degree(values[nl], values[k - 1], center, half, 2 * degree - done)
        y = op.project_out(_filter_block(op, y, step, center, half))
        y, _ = torch.linalg.qr(op.project_out(y))
        done += step
        # Rayleigh-Ritz in the unlocked subspace, then the check over locked + Ritz vectors.
        gy = op(y)
        theta, z = torch.linalg.eigh(y.mT @ gy)
        theta, z = theta.flip(0), z.flip(1)
        ritz = y @ z
        values_all = torch.cat([op.theta, theta])
        if captures_top_energy(evals, values_all, k):
            return torch.cat([op.v, ritz], 1)[:, :k]
        # Lock the leading converged Ritz pairs (only among the wanted k).
        resid = torch.linalg.vector_norm(gy @ z - ritz * theta, dim=0)
        converged = int(torch.cumprod((resid <= lock_residual).to(torch.int64), 0).sum())
        converged = min(converged, k - nl, ritz.shape[1] - 1)
        if converged:
            op.lock(ritz[:, :converged], theta[:converged])
            y = ritz[:, converged:]
        else:
            y = ritz
    return None
