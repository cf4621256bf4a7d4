"""One byte-budget allocator, shared by extraction (``target_size_mb``) and LoraResize (``size=``).

The problem: groups (layers) of items (singular directions), each item with a priority and every
item of a group costing the same bytes (one rank of that layer). Keep the items that fit in a
budget, highest priority first.

The rule: sort every item by priority (descending, ties in group then item order) and keep the
longest prefix of that one order whose bytes fit. Consequences, all tested
(``tests/extract/budget/test_allocate.py``):

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

``fill=True`` (the ``worst`` size objective) goes on past the first item that does not fit:
down the same order, every later item that still fits is kept (a group whose item did not fit
never fits again, its items all cost the same, so each group still keeps a prefix). With
priorities that are each item's group error before it (the current worst layer first), the
prefix is the min-max allocation: all layers at the cheapest ranks meeting one error level, the
lowest level whose bytes fit (the first item left out is the worst layer's next rank, which does
not fit, and every kept item was the worst layer when taken). The fill then lowers the
next-worst layers with the bytes left. Never over budget, each group a prefix, and the worst
group error never rises with the budget (tested); unlike the plain cut, single groups may lose
items when the budget grows (the fill's leftover shrinks), so per-group monotonicity is not
promised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ExtractionInputError


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
    filled: int = 0            # of those, items kept by ``fill`` past the first one left out


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
             required_bytes: int = 0, order: GreedyOrder | None = None,
             fill: bool = False) -> Allocation:
    """Keep the highest-priority items whose bytes, with ``required_bytes``, fit ``budget_bytes``.

    ``priorities[g]``: the priorities of group ``g``'s optional items; ``unit_bytes[g]``: what
    one of them costs. Raises :class:`BudgetTooSmall` when ``required_bytes`` alone exceed it.
    ``order``: a precomputed ``greedy_order`` of the same inputs (the size curve reuses it).
    ``fill``: keep going past the first item that does not fit (see the module docstring).
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
    filled = 0
    if fill and fits < n:
        used, filled = _fill(go, fits, counts, used, budget, int(required_bytes))
    return Allocation(counts=[int(c) for c in counts], threshold=threshold, next_priority=nxt,
                      used_bytes=used, budget_bytes=budget, kept=fits + filled, filled=filled)


def _fill(go: GreedyOrder, start: int, counts: list[int], used: int, budget: int,
          required: int) -> tuple[int, int]:
    """Keep every item after ``start`` that still fits; updates ``counts`` in place.

    Returns the bytes used and the number of items added. Each group stays a prefix without
    bookkeeping: all items of a group cost the same and the bytes used only grow, so once an
    item of a group does not fit, none of its later items will.
    """
    running = go.running_bytes.tolist()
    groups = go.group.tolist()
    added = 0
    for j in range(start, len(groups)):
        cost = running[j] - (running[j - 1] if j else required)
        if used + cost <= budget:
            counts[groups[j]] += 1
            used += cost
            added += 1
    return used, added
