"""Each rank rule pinned on a constructed spectrum, exact and through the randomized path."""

from __future__ import annotations

import pytest
import torch

from lora_extract.extract import ExtractConfig, extract_matrix
from lora_extract.extract.rank_rules import RANK_RULES, SpectrumTotals, select_rank
from tests.support.helpers import matrix_with_spectrum

SIGMA = torch.tensor([10.0, 8.0, 5.0, 2.0, 1.0, 0.5])  # sum 26.5, sum of squares 194.25


@pytest.mark.parametrize("rule,p,cap,expected", [
    ("standard", 0.0, 4, 4),
    ("standard", 0.0, 10, 6),                 # capped by n
    ("adaptive_ratio", 0.15, 8, 4),           # > 1.5: 10, 8, 5, 2
    ("adaptive_ratio", 0.5, 8, 2),            # strictly greater than 5
    ("adaptive_ratio", 0.0, 8, 6),
    ("adaptive_ratio", 1.0, 8, 1),            # none above sigma_1: clamped up to 1
    ("adaptive_quantile", 0.15, 8, 1),        # 3.975 <= 10
    ("adaptive_quantile", 0.5, 8, 2),         # 13.25: 10, 18
    ("adaptive_quantile", 0.7, 8, 3),         # 18.55: 10, 18, 23
    ("adaptive_quantile", 1.0, 8, 6),
    ("adaptive_energy", 0.5, 8, 1),           # 97.125 <= 100
    ("adaptive_energy", 0.9, 8, 3),           # 174.825: 100, 164, 189
    ("adaptive_energy", 0.99, 8, 4),          # 192.3: 189 < 193
    ("adaptive_energy", 0.99, 2, 2),          # cap wins
    ("adaptive_fro", 0.9, 8, 2),              # 12.544: 10, 12.81
    ("adaptive_fro", 0.99, 8, 4),             # 13.798: 13.75 < 13.89
    ("adaptive_fro", 0.0, 8, 1),
])
def test_rule_table(rule: str, p: float, cap: int, expected: int) -> None:
    assert select_rank(rule, SIGMA, p, cap, 6) == expected


def test_totals_override_visible_spectrum() -> None:
    # Only the top 3 values are visible (randomized path); totals come from elsewhere.
    top = SIGMA[:3]
    totals = SpectrumTotals(nuclear=26.5, energy=194.25)
    assert select_rank("adaptive_quantile", top, 0.7, 8, 6, totals) == 3
    assert select_rank("adaptive_energy", top, 0.9, 8, 6, totals) == 3
    # With a target the visible part never reaches, the rank runs to the end and is capped.
    assert select_rank("adaptive_energy", top, 0.99, 8, 6, totals) == 4  # len+1, then min(cap, n)


def test_unknown_rule_is_clear() -> None:
    with pytest.raises(ValueError, match="unknown rank rule"):
        select_rank("nope", SIGMA, 0.1, 4, 6)


def test_registry_has_every_adaptive_type() -> None:
    assert set(RANK_RULES) == {"standard", "adaptive_ratio", "adaptive_quantile",
                               "adaptive_energy", "adaptive_fro"}


# A spectrum with a clear gap after 12 values, then a slowly decaying tail.
GAP_SIGMA = torch.cat([torch.linspace(10.0, 4.0, 12), 0.3 * 0.97 ** torch.arange(100.0)])


@pytest.mark.parametrize("lora_type,p", [
    ("adaptive_ratio", 0.2), ("adaptive_quantile", 0.5), ("adaptive_energy", 0.9),
    ("adaptive_fro", 0.95),
])
def test_lowrank_rank_matches_exact_on_gap_spectrum(lora_type: str, p: float, gen: torch.Generator) -> None:
    # Large enough that svd_lowrank really takes the randomized path (sketch << min side).
    a = matrix_with_spectrum(1000, 800, GAP_SIGMA, gen)
    exact_cfg = ExtractConfig(rank=32, lora_type=lora_type, adaptive_param=p, clamp_quantile=None,
                              output_dtype="fp32")
    low_cfg = ExtractConfig(rank=32, lora_type=lora_type, adaptive_param=p, clamp_quantile=None,
                            output_dtype="fp32", algorithm="svd_lowrank")
    exact = extract_matrix(a.clone(), exact_cfg).factors.rank
    low = extract_matrix(a.clone(), low_cfg, generator=torch.Generator().manual_seed(0)).factors.rank
    expected = select_rank(lora_type, torch.linalg.svdvals(a.double()).float(), p, 32, 800)
    assert exact == expected
    assert low == exact


@pytest.mark.parametrize("lora_type,p", [
    ("adaptive_ratio", 0.3), ("adaptive_quantile", 0.3), ("adaptive_energy", 0.8),
    ("adaptive_fro", 0.9),
])
def test_lowrank_rank_within_one_on_smooth_spectrum(lora_type: str, p: float, gen: torch.Generator) -> None:
    sigma = 0.96 ** torch.arange(400.0)  # no gap anywhere
    a = matrix_with_spectrum(1000, 800, sigma, gen)
    common = dict(rank=48, lora_type=lora_type, adaptive_param=p, clamp_quantile=None, output_dtype="fp32")
    exact = extract_matrix(a.clone(), ExtractConfig(**common)).factors.rank
    low = extract_matrix(a.clone(), ExtractConfig(**common, algorithm="svd_lowrank"),
                         generator=torch.Generator().manual_seed(0)).factors.rank
    assert abs(low - exact) <= 1


@pytest.mark.parametrize("rule", ["adaptive_quantile", "adaptive_energy"])
def test_a_target_met_exactly_counts_as_reached(rule: str) -> None:
    """Four equal values, p = 0.5: the partial sum of two is exactly the target, so the rank
    is 2 (the rule's >=), not 3."""
    assert select_rank(rule, torch.ones(4), 0.5, 8, 4) == 2


def test_layer_kinds_by_shape() -> None:
    from lora_extract.extract.layer import layer_kind

    assert [layer_kind(s) for s in [(8, 4), (8, 4, 1, 1), (8, 4, 3, 3), (8, 4, 3), (8, 4, 1, 3, 3),
                                    (8,), ()]] == \
        ["linear", "conv1x1", "conv", "conv1d", "conv3d", "vector", "scalar"]


def test_randomized_path_reports_the_energy_it_leaves_out(gen: torch.Generator) -> None:
    """On the randomized path the error before clamp and cast is ||dW||^2 minus the kept
    energy: on a known spectrum it is the optimal truncation error (fp16 output, so the number
    is this estimate, not the measured residual that fp32 without a clamp reports)."""
    sigma = torch.tensor([9.0, 7.0, 5.0, 3.0] + [0.5] * 60)
    diff = matrix_with_spectrum(160, 128, sigma, gen)
    cfg = ExtractConfig(rank=4, algorithm="svd_lowrank", clamp_quantile=None, output_dtype="fp16")
    res = extract_matrix(diff.clone(), cfg, generator=torch.Generator().manual_seed(0))
    optimal = float((sigma[4:] ** 2).sum().sqrt() / (sigma ** 2).sum().sqrt())
    assert res.rel_error_unclamped == pytest.approx(optimal, rel=2e-3)
