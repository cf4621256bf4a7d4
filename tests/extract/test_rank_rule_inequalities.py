"""Each adaptive rule's own inequality holds at the rank it picks.

On spectra with many values, checked in float64 against the definition (docs/nodes.md, rank rules):
- adaptive_energy: kept energy >= p of the total, and one rank fewer < p;
- adaptive_fro: sqrt(kept energy) >= p ||dW||_F, and one rank fewer < p ||dW||_F;
- adaptive_quantile: sum of the kept sigma >= p of the nuclear norm, one fewer < p;
- adaptive_ratio: every kept sigma > p sigma_1, and the next one <= p sigma_1.
First through ``select_rank`` with exact totals, then end to end through ``extract_matrix``,
which takes ||dW||_F from the difference itself (the total a float32 norm got wrong).
"""

from __future__ import annotations

import math

import pytest
import torch

from lora_extract.extract import ExtractConfig, extract_matrix
from lora_extract.extract.rank_rules import SpectrumTotals, select_rank
from tests.support.helpers import matrix_with_spectrum

RULES = ["adaptive_energy", "adaptive_fro", "adaptive_quantile", "adaptive_ratio"]
PARAMS = [0.05, 0.3, 0.6, 0.9, 0.97]


def _spectra() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = 3000
    i = torch.arange(n, dtype=torch.float64)
    return {
        "geometric": 0.998 ** i,
        "power": 1.0 / (1.0 + i) ** 0.6,
        "noisy": (torch.rand(n, generator=g, dtype=torch.float64) * 4).exp().sort(descending=True).values,
        "head_and_tail": torch.cat([torch.linspace(50, 10, 40, dtype=torch.float64),
                                    0.5 * 0.999 ** torch.arange(n - 40, dtype=torch.float64)]),
    }


def _holds(rule: str, sigma: torch.Tensor, p: float, k: int) -> tuple[bool, bool]:
    """(the rule's inequality at k, its negation at k - 1), in float64 from the definition."""
    s = sigma.double()
    if rule == "adaptive_ratio":
        kept_ok = bool((s[:k] > p * s[0]).all())
        next_ok = k == s.numel() or bool(s[k] <= p * s[0])
        return kept_ok, next_ok
    if rule == "adaptive_quantile":
        cum, target = s.cumsum(0), p * float(s.sum())
    elif rule == "adaptive_energy":
        cum, target = (s ** 2).cumsum(0), p * float((s ** 2).sum())
    else:
        cum, target = (s ** 2).cumsum(0).sqrt(), p * math.sqrt(float((s ** 2).sum()))
    at_k = float(cum[k - 1]) >= target
    fewer = k == 1 or float(cum[k - 2]) < target
    return at_k, fewer


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name", list(_spectra()))
def test_rule_inequality_on_long_spectra(rule: str, name: str) -> None:
    sigma = _spectra()[name]
    totals = SpectrumTotals(nuclear=float(sigma.sum()), energy=float((sigma ** 2).sum()))
    for p in PARAMS:
        k = select_rank(rule, sigma.float(), p, 4096, sigma.numel(), totals)
        at_k, fewer = _holds(rule, sigma.float(), p, k)
        assert at_k and fewer, (rule, name, p, k)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("algorithm", ["svd_linalg", "svd_lowrank"])
def test_rule_inequality_end_to_end(rule: str, algorithm: str) -> None:
    # 600 distinct singular values; the oracle is torch's float64 spectrum of the matrix itself.
    n = 600
    sigma = 1.0 / (1.0 + torch.arange(n, dtype=torch.float64)) ** 0.7
    a = matrix_with_spectrum(900, n, sigma.float(), torch.Generator().manual_seed(11))
    true = torch.linalg.svdvals(a.double())
    # The randomized path sees the top (cap + oversample) values: give it a cap it can reach.
    cap = n if algorithm == "svd_linalg" else 120
    for p in (0.3, 0.6, 0.9) if rule != "adaptive_ratio" else (0.05, 0.2, 0.5):
        cfg = ExtractConfig(rank=cap, lora_type=rule, adaptive_param=p, algorithm=algorithm,
                            output_dtype="fp32", clamp_quantile=None, lowrank_iters=7)
        k = extract_matrix(a.clone(), cfg, generator=torch.Generator().manual_seed(0)).factors.rank
        if k == cap:
            continue      # capped: the inequality is the cap's, not the rule's
        at_k, fewer = _holds(rule, true, p, k)
        assert at_k and fewer, (rule, algorithm, p, k)
