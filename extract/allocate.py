"""One byte-budget allocator, shared by extraction (``target_size_mb``) and LoraResize (``size=``).

The problem: groups (layers) of items (singular directions), each item with a priority and every
item of a group costing the same bytes (one rank of that layer). Keep the items that fit in a
budget, highest priority first.

The rule: sort every item by priority (descending, ties in group then item order) and keep the
longest prefix of that one order whose bytes fit. Consequences, all tested
(``tests/test_allocate.py``):

- it never exceeds the budget (the prefix is cut where the running bytes pass it);
- it is monotone: a larger budget keeps a longer prefix of the same order, so every group keeps
  at least as many items (elementwise), and the total priority-weighted gain never drops;
- when the caller's priority is gain / bytes and each group's gains do not increase (concave
  value per group, as singular values give), the kept items of a group are a prefix (a rank),
  and the result is within one item of the optimum: the fractional relaxation's optimum is this
  prefix plus a fraction of the first rejected item, so
  ``optimum - greedy <= gain of the first rejected item``. When every item costs the same it is
  exactly optimal. Otherwise it can miss the optimum by that one item (a small knapsack gap:
  bytes left over that a cheaper item further down the order could have used); the tests check
  the bound against an exact dynamic program.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ExtractionInputError


class BudgetTooSmall(ExtractionInputError):
    """The required bytes alone do not fit; ``smallest_bytes`` is the least budget that would."""

    def __init__(self, message: str, smallest_bytes: int) -> None:
        super().__init__(message)
        self.smallest_bytes = smallest_bytes


@dataclass(frozen=True)
class GreedyOrder:
    """Every optional item in the allocator's order, with the running bytes after each."""

    group: torch.Tensor        # int64 [N]: the item's group
    item: torch.Tensor         # int64 [N]: the item's index inside its group
    priority: torch.Tensor     # float64 [N], non-increasing
    running_bytes: torch.Tensor  # int64 [N]: required bytes + bytes of items 0..j


@dataclass(frozen=True)
class Allocation:
    counts: list[int]          # optional items kept per group
    threshold: float           # priority of the last item kept; -inf: all fit; +inf: none kept
    next_priority: float       # priority of the first item left out (-inf: all fit)
    used_bytes: int            # required bytes + kept items' bytes (<= budget_bytes)
    budget_bytes: int
    kept: int                  # optional items kept in all


def greedy_order(priorities: Sequence[torch.Tensor], unit_bytes: Sequence[int],
                 required_bytes: int = 0) -> GreedyOrder:
    """The one order every budget cuts: priority descending, stable in (group, item)."""
    if len(priorities) != len(unit_bytes):
        raise ValueError("one unit cost per group is needed")
    pri = [p.detach().to("cpu", torch.float64).reshape(-1) for p in priorities]
    flat = torch.cat(pri) if pri else torch.zeros(0, dtype=torch.float64)
    if bool(torch.isnan(flat).any()):
        raise ValueError("allocator priorities contain NaN")
    sizes = torch.tensor([p.numel() for p in pri], dtype=torch.int64)
    group = torch.repeat_interleave(torch.arange(len(pri), dtype=torch.int64), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    item = torch.arange(flat.numel(), dtype=torch.int64) - torch.repeat_interleave(starts, sizes)
    costs = torch.tensor([int(b) for b in unit_bytes], dtype=torch.int64)[group]
    order = torch.argsort(flat, descending=True, stable=True)
    running = torch.cumsum(costs[order], 0) + int(required_bytes)
    return GreedyOrder(group[order], item[order], flat[order], running)


def allocate(priorities: Sequence[torch.Tensor], unit_bytes: Sequence[int], budget_bytes: int,
             required_bytes: int = 0, order: GreedyOrder | None = None) -> Allocation:
    """Keep the highest-priority items whose bytes, with ``required_bytes``, fit ``budget_bytes``.

    ``priorities[g]``: the priorities of group ``g``'s optional items; ``unit_bytes[g]``: what
    one of them costs. Raises :class:`BudgetTooSmall` when ``required_bytes`` alone exceed it.
    ``order``: a precomputed ``greedy_order`` of the same inputs (the size curve reuses it).
    """
    budget = int(budget_bytes)
    if required_bytes > budget:
        raise BudgetTooSmall(f"the required {required_bytes} bytes exceed the budget of "
                             f"{budget} bytes", int(required_bytes))
    go = order or greedy_order(priorities, unit_bytes, required_bytes)
    n = go.running_bytes.numel()
    fits = int(torch.searchsorted(go.running_bytes, torch.tensor([budget]), right=True)[0])
    counts = torch.bincount(go.group[:fits], minlength=len(priorities)).tolist() if n else \
        [0] * len(priorities)
    used = int(go.running_bytes[fits - 1]) if fits else int(required_bytes)
    threshold = float(go.priority[fits - 1]) if fits else math.inf
    nxt = float(go.priority[fits]) if fits < n else -math.inf
    if fits == n:
        threshold = -math.inf
    return Allocation(counts=[int(c) for c in counts], threshold=threshold, next_priority=nxt,
                      used_bytes=used, budget_bytes=budget, kept=fits)
