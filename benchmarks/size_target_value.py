"""Is a size budget worth it? ``target_size_mb`` against uniform ranks and tuned adaptive rules.

    python benchmarks/size_target_value.py [--scale 0.3] [--cap 128] [--verify] [--frontier]

Two generated pairs (``bench_pairs.py``): SDXL/DiT shapes with the same spectrum shape in every
layer, and the same shapes with each layer's decay and noise varied (``varied_spectrum``), as a
fine-tune changes some layers more than others. Each pair's spectra come from one exact pass
(``svd_linalg``, caps ``--cap``); then at budgets of 25%, 50% and 100% of a rank-32 file's tensors:

- ``target_size_mb``: the allocator's ranks (caps ``--cap``), with ``size_objective`` ``mean``
  (the default) and ``worst``;
- uniform rank: the smallest rank whose file is at least the budget (same or larger size);
- each adaptive rule (caps ``--cap``), its parameter bisected to the largest file within the
  budget. With the exact SVD a rule's rank is a function of the exact spectrum, so the sizes
  and errors computed here are those the files get (``--verify`` extracts the budgeted and the
  uniform files and checks the measured errors against these).

Per layer, the relative error ||dW - stored|| / ||dW|| of the truncated SVD (no clamp: the
clamp is a separate choice that adds error to every method). "worst decile": the mean error of
the worst 10% of layers. All numbers from one run.

``--frontier``: for each budget, the exact frontier of (mean, worst decile) over every rank
combination that fits (``size_frontier.py``), and whether any point of it beats the best other
method's mean and the best other method's worst decile at once.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
from bench_pairs import SDXL_DIT_MIX, specs, write_pair
from size_frontier import frontier

from lora_extract.extract import ExtractConfig, SafetensorsSource, extract_lora
from lora_extract.extract.budget.passes import spectra_only
from lora_extract.extract.budget.rank_math import ALPHA_BYTES, plan_ranks
from lora_extract.extract.pair_output import layer_generator
from lora_extract.extract.rank_rules import SpectrumTotals, select_rank

RULES = ("adaptive_ratio", "adaptive_quantile", "adaptive_energy", "adaptive_fro")
SHARES = (0.25, 0.5, 1.0)


class Layer:
    def __init__(self, key: str, sigma: torch.Tensor, energy: float, unit: int, n: int) -> None:
        self.key, self.sigma, self.energy, self.unit, self.n = key, sigma.double(), energy, unit, n
        tail = energy - torch.cumsum(self.sigma ** 2, 0)
        self.err = torch.cat([torch.tensor([1.0], dtype=torch.float64),
                              (tail.clamp_min(0) / energy).sqrt()])   # err[r], r = 0..len

    def error(self, r: int) -> float:
        return float(self.err[min(r, self.err.numel() - 1)])


def load(varied: bool, scale: float, cap: int):
    bp, tp = write_pair(specs(SDXL_DIT_MIX, scale), varied=varied)
    cfg = ExtractConfig(rank=cap, algorithm="svd_linalg", clamp_quantile=None)
    spectra, _ = spectra_only(SafetensorsSource(bp), SafetensorsSource(tp), cfg,
                              lambda path: layer_generator(cfg, path))
    layers = []
    for x in spectra.layers:
        svd, fro = spectra.kept[x.key]
        layers.append(Layer(x.key, svd.S, fro * fro, x.unit_bytes, svd.S.numel()))
    return bp, tp, spectra, layers


def size_of(layers, ranks, fixed: int) -> int:
    return fixed + sum(r * x.unit + ALPHA_BYTES for x, r in zip(layers, ranks, strict=True))


def stats(layers, ranks) -> tuple[float, float]:
    errs = sorted((x.error(r) for x, r in zip(layers, ranks, strict=True)), reverse=True)
    worst = errs[: max(1, math.ceil(len(errs) / 10))]
    return statistics.fmean(errs), statistics.fmean(worst)


def rule_ranks(layers, rule: str, p: float, cap: int) -> list[int]:
    out = []
    for x in layers:
        totals = SpectrumTotals(nuclear=float(x.sigma.sum()), energy=x.energy)
        out.append(select_rank(rule, x.sigma, p, cap, x.n, totals))
    return out


def tune_rule(layers, rule: str, budget: int, fixed: int, cap: int):
    """Bisect p for the largest file within ``budget`` (ratio: larger p, fewer ranks)."""
    grows = rule != "adaptive_ratio"
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(50):
        mid = (lo + hi) / 2
        ranks = rule_ranks(layers, rule, mid, cap)
        fits = size_of(layers, ranks, fixed) <= budget
        if fits:
            best = (mid, ranks)
        if fits == grows:
            lo = mid
        else:
            hi = mid
    if best is None:                      # even the smallest setting is over: report it
        p = 1.0 if not grows else 0.0
        best = (p, rule_ranks(layers, rule, p, cap))
    return best


def compare(name: str, layers, fixed: int, cap: int, with_frontier: bool = False) -> list[tuple]:
    r32 = size_of(layers, [min(32, x.n) for x in layers], fixed)
    rows = []
    print(f"\n## {name}: {len(layers)} LoRA layers; rank-32 file tensors {r32 / 2**20:.2f} MiB")
    print(f"{'budget':>8} {'method':<28} {'MiB':>8} {'mean err':>9} {'worst 10%':>10}")
    for share in SHARES:
        budget = int(r32 * share)
        cands = []
        plan = plan_ranks([_as_spectrum(x, cap) for x in layers], fixed, budget)
        cands.append(("target_size_mb", plan.ranks))
        worst = plan_ranks([_as_spectrum(x, cap) for x in layers], fixed, budget, "worst")
        cands.append(("target_size_mb worst", worst.ranks))
        u = 1
        while size_of(layers, [min(u, x.n) for x in layers], fixed) < budget:
            u += 1
        cands.append((f"uniform rank {u}", [min(u, x.n) for x in layers]))
        for rule in RULES:
            p, ranks = tune_rule(layers, rule, budget, fixed, cap)
            cands.append((f"{rule} p={p:.4g}", ranks))
        results = [(m, size_of(layers, r, fixed), *stats(layers, r)) for m, r in cands]
        for m, size, mean, worst in results:
            print(f"{share:>7.0%} {m:<28} {size / 2**20:8.2f} {mean:9.4f} {worst:10.4f}")
        low_mean = min(t[2] for t in results)
        low_worst = min(t[3] for t in results)
        best_mean = [m for m, _, mean, _ in results if mean <= low_mean + 1e-12]
        best_worst = [m for m, _, _, w in results if w <= low_worst + 1e-12]
        print(f"{'':>8} lowest mean: {', '.join(best_mean)}; lowest worst decile (ties listed): "
              f"{', '.join(best_worst)}")
        if with_frontier:
            _frontier_line(layers, fixed, cap, budget, results)
        rows.append((share, budget, results, plan.ranks, u))
    return rows


def _frontier_line(layers, fixed: int, cap: int, budget: int, results) -> None:
    others = [t for t in results if not t[0].startswith("target_size_mb")]
    mean_to_beat, worst_to_beat = min(t[2] for t in others), min(t[3] for t in others)
    errors = [x.err[1: min(cap, x.n) + 1] for x in layers]
    points = [stats(layers, r) for r in
              frontier(errors, [x.unit for x in layers], budget - fixed - ALPHA_BYTES * len(layers))]
    both = [p for p in points if p[0] < mean_to_beat and p[1] < worst_to_beat]
    print(f"{'':>8} frontier ({len(points)} exact solutions): least mean {min(p[0] for p in points):.4f}, "
          f"least worst decile {min(p[1] for p in points):.4f}; beating the other methods' best mean "
          f"{mean_to_beat:.4f} and best worst decile {worst_to_beat:.4f} at once: {len(both)}")


def _as_spectrum(x: Layer, cap: int):
    from lora_extract.extract.budget.rank_math import LayerSpectrum

    return LayerSpectrum(x.key, x.sigma, x.energy, x.unit, min(cap, x.n))


def verify(bp: str, tp: str, layers, cap: int, share_rows) -> None:
    """Extract the budgeted and uniform files of the middle budget; compare measured errors."""
    share, budget, results, _ranks, u = share_rows[1]
    b, t = SafetensorsSource(bp), SafetensorsSource(tp)
    for label, cfg in (("target_size_mb", ExtractConfig(rank=cap, algorithm="svd_linalg",
                                                        clamp_quantile=None,
                                                        target_size_mb=budget / 2**20)),
                       ("target_size_mb worst", ExtractConfig(rank=cap, algorithm="svd_linalg",
                                                              clamp_quantile=None,
                                                              target_size_mb=budget / 2**20,
                                                              size_objective="worst")),
                       (f"uniform rank {u}", ExtractConfig(rank=u, algorithm="svd_linalg",
                                                           clamp_quantile=None))):
        rep = extract_lora(b, t, cfg).report
        errs = sorted((r.rel_error for r in rep.layers if r.rank), reverse=True)
        worst = statistics.fmean(errs[: max(1, math.ceil(len(errs) / 10))])
        print(f"  verify {label:<20} file tensors {rep.tensor_bytes / 2**20:.2f} MiB: measured mean "
              f"{statistics.fmean(errs):.4f}, worst 10% {worst:.4f} (fp16 factors)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.3)
    ap.add_argument("--cap", type=int, default=128)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--frontier", action="store_true",
                    help="also trace the exact (mean, worst decile) frontier at each budget")
    a = ap.parse_args()
    torch.set_num_threads(2)
    for varied in (False, True):
        name = "varied spectra" if varied else "same spectrum shape in every layer"
        bp, tp, spectra, layers = load(varied, a.scale, a.cap)
        rows = compare(name, layers, spectra.fixed_bytes, a.cap, a.frontier)
        if a.verify:
            verify(bp, tp, layers, a.cap, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
