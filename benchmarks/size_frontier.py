"""Can any allocation beat every method's mean and worst decile at once? The exact frontier.

For one budget, every rank combination is a point (mean relative error, mean of the worst 10%
of layers). The lower-left frontier of those points is traced by minimising
``mean + lam * worst_decile`` exactly, for a grid of ``lam``: the worst decile (the mean of the
k largest errors) is ``min over tau of tau + sum(max(e - tau, 0)) / k``, so for fixed
``(lam, tau)`` the objective is a sum over layers and a multiple-choice knapsack solves it
exactly (dynamic programming over bytes, in units of the layers' common byte divisor).
Every supported point of the frontier is found this way; points between them (non-convex
corners) are not, which the report says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 100.0, 1000.0)


def frontier(errors: Sequence[torch.Tensor], unit_bytes: Sequence[int], spare_bytes: int,
             taus: int = 60) -> list[list[int]]:
    """Rank vectors on the supported frontier of (mean error, worst-decile error).

    ``errors[i][r - 1]``: layer i's relative error at rank r; ``unit_bytes[i]``: one rank's
    bytes; ``spare_bytes``: the budget minus rank 0 everywhere's fixed bytes.
    """
    n = len(errors)
    k = max(1, math.ceil(n / 10))
    unit = math.gcd(*[int(u) for u in unit_bytes])
    cost = [int(u) // unit for u in unit_bytes]
    cap_b = spare_bytes // unit
    values = sorted({float(t) for e in errors for t in e})
    grid = [0.0, *values[:: max(1, len(values) // taus)]]
    found: list[list[int]] = []
    for lam in LAMBDAS:
        for tau in grid:
            found.append(_solve(errors, cost, cap_b, n, k, lam, tau))
    return found


def _solve(errors, cost, cap_b, n, k, lam, tau) -> list[int]:
    """One exact multiple-choice knapsack: best[b] = least objective in at most b units."""
    inf = float("inf")
    best = torch.full((cap_b + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for e, c in zip(errors, cost, strict=True):
        f = e / n + lam * (e - tau).clamp_min(0) / k
        ranks = min(e.numel(), cap_b // c)
        if ranks < 1:
            raise ValueError("the budget does not hold rank 1 of every layer")
        steps = [(r + 1) * c for r in range(ranks)]
        padded = torch.cat([torch.full((steps[-1],), inf, dtype=torch.float64), best])
        # Row r: the best objective with this layer at rank r + 1, for every byte count.
        table = torch.stack([padded[steps[-1] - s: steps[-1] - s + cap_b + 1] for s in steps])
        table += f[:ranks, None]
        best, arg = table.min(0)
        choices.append(arg + 1)
    b = int(torch.argmin(best))
    out = []
    for i in range(n - 1, -1, -1):
        r = int(choices[i][b])
        out.append(r)
        b -= r * cost[i]
    return out[::-1]
