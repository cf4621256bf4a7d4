"""Rank selection rules: one registry shared by extraction and resize.

Each rule maps a descending spectrum to a rank. Rules that need totals over the *whole*
spectrum (the sum of all singular values, or of their squares) take them as arguments, so the
randomized path, which only sees the top of the spectrum, can pass exact totals computed
cheaply elsewhere (``||dW||_F^2`` and the nuclear norm).

With sigma sorted descending, p the rule parameter, R the cap, n = min(out, in):

- ``standard``: k = min(R, n)
- ``adaptive_ratio``: k = #{i : sigma_i > p * sigma_1}
- ``adaptive_quantile``: smallest k with sum_{i<=k} sigma_i >= p * sum_all sigma_i
- ``adaptive_energy``: smallest k with sum_{i<=k} sigma_i^2 >= p * sum_all sigma_i^2
- ``adaptive_fro``: smallest k with sqrt(sum_{i<=k} sigma_i^2) >= p * ||dW||_F

and then k is clamped to [1, min(R, n)].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpectrumTotals:
    """Totals over the whole spectrum: sum of sigma (nuclear norm) and sum of sigma^2."""

    nuclear: float | None = None
    energy: float | None = None


# A rule returns an unclamped rank from (sigma descending, param, totals).
RankRule = Callable[[torch.Tensor, float, SpectrumTotals], int]

RANK_RULES: dict[str, RankRule] = {}
# Which totals a rule needs beyond the visible spectrum; lets callers compute only those.
RULE_NEEDS: dict[str, frozenset[str]] = {}


def register_rank_rule(name: str, needs: frozenset[str] = frozenset()) -> Callable[[RankRule], RankRule]:
    def deco(fn: RankRule) -> RankRule:
        RANK_RULES[name] = fn
        RULE_NEEDS[name] = needs
        return fn
    return deco


def _first_reaching(cumulative: torch.Tensor, target: float) -> int:
    """Smallest k (1-based) with cumulative[k-1] >= target; len+1 if never reached."""
    # A tiny relative slack absorbs float rounding when the target equals a partial sum exactly.
    slack = 1e-7 * abs(target)
    hits = torch.nonzero(cumulative >= target - slack)
    return int(hits[0, 0]) + 1 if hits.numel() else cumulative.numel() + 1


@register_rank_rule("standard")
def _standard(sigma: torch.Tensor, p: float, totals: SpectrumTotals) -> int:
    return sigma.numel()


@register_rank_rule("adaptive_ratio")
def _ratio(sigma: torch.Tensor, p: float, totals: SpectrumTotals) -> int:
    if sigma.numel() == 0:
        return 0
    return int((sigma > p * sigma[0]).sum())


@register_rank_rule("adaptive_quantile", frozenset({"nuclear"}))
def _quantile(sigma: torch.Tensor, p: float, totals: SpectrumTotals) -> int:
    total = totals.nuclear if totals.nuclear is not None else float(sigma.sum())
    return _first_reaching(torch.cumsum(sigma.double(), 0), p * total)


@register_rank_rule("adaptive_energy", frozenset({"energy"}))
def _energy(sigma: torch.Tensor, p: float, totals: SpectrumTotals) -> int:
    total = totals.energy if totals.energy is not None else float((sigma.double() ** 2).sum())
    return _first_reaching(torch.cumsum(sigma.double() ** 2, 0), p * total)


@register_rank_rule("adaptive_fro", frozenset({"energy"}))
def _fro(sigma: torch.Tensor, p: float, totals: SpectrumTotals) -> int:
    total = totals.energy if totals.energy is not None else float((sigma.double() ** 2).sum())
    fro = math.sqrt(total)
    return _first_reaching(torch.sqrt(torch.cumsum(sigma.double() ** 2, 0)), p * fro)


def select_rank(rule: str, sigma: torch.Tensor, param: float, cap: int, n: int,
                totals: SpectrumTotals | None = None) -> int:
    """Apply ``rule`` and clamp the result to [1, min(cap, n)]."""
    try:
        fn = RANK_RULES[rule]
    except KeyError:
        raise ValueError(f"unknown rank rule {rule!r}; choose one of {sorted(RANK_RULES)}") from None
    k = fn(sigma.detach().to("cpu", torch.float64), float(param), totals or SpectrumTotals())
    return max(1, min(k, cap, n))
