"""The shared byte-budget allocator: budget never exceeded, monotone, and vs an exact optimum.

Groups have non-increasing gains (a layer's singular values squared) and one byte cost per item
(a rank of that layer); priority = gain / cost, as extraction's ``target_size_mb`` uses it.
The oracle is an exact dynamic program over (group, rank) choices.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_extract.extract.budget.allocate import BudgetTooSmall, allocate, greedy_order

PROPS = settings(max_examples=200, deadline=None, derandomize=True, database=None)


@st.composite
def problems(draw, equal_costs: bool = False):
    n_groups = draw(st.integers(1, 4))
    cost0 = draw(st.integers(1, 6))
    groups = []
    for _ in range(n_groups):
        n = draw(st.integers(0, 5))
        gains = sorted(draw(st.lists(st.integers(0, 50), min_size=n, max_size=n)), reverse=True)
        cost = cost0 if equal_costs else draw(st.integers(1, 6))
        groups.append(([float(g) for g in gains], cost))
    total = sum(len(g) * c for g, c in groups)
    budget = draw(st.integers(0, total + 3))
    return groups, budget


def run(groups, budget, required=0):
    pri = [torch.tensor(g, dtype=torch.float64) / c for g, c in groups]
    return allocate(pri, [c for _, c in groups], budget, required_bytes=required)


def gain_of(groups, counts) -> float:
    return sum(sum(g[:k]) for (g, _), k in zip(groups, counts, strict=True))


def dp_optimum(groups, budget) -> float:
    """Exact best total gain with prefix (rank) choices per group, by dynamic programming."""
    best = [0.0] * (budget + 1)       # best[b]: max gain with at most b bytes
    for gains, cost in groups:
        prefix = [0.0]
        for g in gains:
            prefix.append(prefix[-1] + g)
        new = best[:]
        for b in range(budget + 1):
            for k in range(1, len(gains) + 1):
                if k * cost <= b:
                    new[b] = max(new[b], best[b - k * cost] + prefix[k])
        best = new
    return best[budget]


@PROPS
@given(problems())
def test_never_exceeds_the_budget_and_counts_bytes_exactly(p):
    groups, budget = p
    a = run(groups, budget)
    spent = sum(k * c for (_, c), k in zip(groups, a.counts, strict=True))
    assert a.used_bytes == spent <= budget
    assert all(0 <= k <= len(g) for (g, _), k in zip(groups, a.counts, strict=True))


@PROPS
@given(problems(), st.integers(0, 20))
def test_monotone_in_the_budget_elementwise(p, extra):
    groups, budget = p
    small, large = run(groups, budget), run(groups, budget + extra)
    # A larger budget cuts a longer prefix of the same order: every group keeps at least as
    # many items, so the total gain (error removed) never drops.
    assert all(a <= b for a, b in zip(small.counts, large.counts, strict=True))
    assert gain_of(groups, small.counts) <= gain_of(groups, large.counts)


@PROPS
@given(problems())
def test_within_one_item_of_the_exact_optimum(p):
    groups, budget = p
    a = run(groups, budget)
    opt = dp_optimum(groups, budget)
    got = gain_of(groups, a.counts)
    assert got <= opt + 1e-9
    # The first item left out bounds the gap (fractional-relaxation argument in allocate.py).
    nxt = 0.0
    for g, (gains, cost) in enumerate(groups):
        k = a.counts[g]
        if k < len(gains) and gains[k] / cost == a.next_priority:
            nxt = max(nxt, gains[k])
    assert opt - got <= nxt + 1e-9


@PROPS
@given(problems(equal_costs=True))
def test_exactly_optimal_when_every_item_costs_the_same(p):
    groups, budget = p
    assert gain_of(groups, run(groups, budget).counts) == pytest.approx(dp_optimum(groups, budget))


def test_a_case_where_greedy_is_not_optimal_and_the_gap_is_the_rejected_item():
    # ratio order: A (6.6/6 = 1.1) first; then B (5/5) no longer fits in 10. Optimum: B + C.
    groups = [([6.6], 6), ([5.0], 5), ([5.0], 5)]
    a = run(groups, 10)
    assert a.counts == [1, 0, 0] and a.used_bytes == 6
    assert dp_optimum(groups, 10) == 10.0
    assert 10.0 - gain_of(groups, a.counts) <= 5.0


def test_required_bytes_come_first_and_a_too_small_budget_names_them():
    groups = [([4.0, 1.0], 2)]
    assert run(groups, 7, required=3).counts == [2]
    assert run(groups, 6, required=3).counts == [1]
    with pytest.raises(BudgetTooSmall) as e:
        run(groups, 2, required=3)
    assert e.value.smallest_bytes == 3


def test_kept_items_of_a_group_are_a_prefix_even_with_ties():
    pri = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0])]
    a = allocate(pri, [1, 1], 3)
    assert a.counts == [3, 0]            # stable: group order, then item order
    go = greedy_order(pri, [1, 1])
    assert go.item.tolist() == [0, 1, 2, 0, 1]


def test_threshold_semantics():
    pri = [torch.tensor([3.0, 1.0]), torch.tensor([2.0])]
    a = allocate(pri, [1, 1], 2)
    assert a.threshold == 2.0 and a.next_priority == 1.0
    assert allocate(pri, [1, 1], 10).threshold == -math.inf
    assert allocate(pri, [1, 1], 0).threshold == math.inf


def test_resize_size_recipes_cut_with_the_same_allocator(monkeypatch):
    import lora_extract.resize.scoring as scoring

    calls = []
    real = scoring.allocate

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(scoring, "allocate", spy)

    class Layer:
        def __init__(self, p):
            self.p = p

        def params_per_rank(self):
            return self.p
    from lora_extract.resize.recipe import parse_recipe

    recipe = parse_recipe("spn_lora=1,size=0.0001")
    scores = [torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)]
    thr = scoring._size_threshold([Layer(10), Layer(10)], scores, torch.cat(scores), recipe, 2, 0)
    # 0.0001 MiB = 104 bytes: dimensions of 20 bytes each, best first: 3, 2, 1 all fit.
    assert calls and thr == -math.inf
    recipe = parse_recipe("spn_lora=1,size=0.00004")   # 41 bytes: two dimensions
    assert scoring._size_threshold([Layer(10), Layer(10)], scores, torch.cat(scores), recipe, 2, 0) == 2.0
