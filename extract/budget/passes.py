"""Extraction to a file size (``target_size_mb``): two streaming passes over the model pair.

Pass 1 decomposes every LoRA layer at its cap (the same decomposition a fixed-rank run at the
cap does) and keeps the cap's factors (U, S, Vh in float32 on the CPU: the size of a rank-cap
LoRA in fp32, e.g. 92 MiB at rank 32 on the 2 GB benchmark pair) with the layer's norm. The
allocator then picks every layer's rank from the spectra. Pass 2 reads each difference again,
only to truncate the kept factors to the chosen rank and measure the stored factors' error
exactly (clamp and dtype cast included): no second SVD. Measured on the benchmarks: see the
docs/size-target.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..callbacks import InterruptFn, ProgressFn
from ..change_threshold import small_change_reason
from ..config import ExtractConfig
from ..decompose import randomized_svd
from ..exact_svd import exact_svd
from ..layer import finish_extraction, svd_plan
from ..layer_config import layer_config
from ..new_tensors import new_tensor_bytes
from ..oom_fallback import OomFallback
from ..pair_output import left_out_as_noise, needs_svd, stored_role
from ..pairing import KeyPair, PairPlan, load_difference
from ..prefetch import Prefetcher
from ..report import ExtractionReport
from ..run_setup import set_up_run
from ..sources import WeightSource
from ..truncated_svd import TruncatedSVD
from ..waits import RunWatch
from .fit_check import check_budget_fits
from .rank_math import LayerSpectrum, RankPlan, plan_ranks, rank_unit_bytes, size_curve
from .report_curve import stored_diff_bytes
from .size_types import CurvePoint, SizeCurve


def stores_diff(pair: KeyPair, fro: float, cfg: ExtractConfig, plan: PairPlan) -> bool:
    """Whether ``process_pair`` stores this parameter's difference as is (a layer left out as
    quantization noise is stored neither way: it takes no part of the budget)."""
    return (fro != 0.0 and cfg.bias_diff and stored_role(pair, cfg, plan) is not None
            and not needs_svd(pair, fro, cfg, plan)
            and not left_out_as_noise(pair, fro, cfg, plan)
            and small_change_reason(pair, fro, cfg, plan) is None)


def decompose_at_cap(diff: torch.Tensor, cfg: ExtractConfig,
                     generator: torch.Generator | None) -> TruncatedSVD:
    """The cap's triplets of one difference, as compact CPU float32 copies.

    The same decomposition ``extract_matrix`` makes for a ``standard`` run at the cap; exact
    paths keep every singular value (the error of any rank is then exact).
    """
    mat = diff.reshape(diff.shape[0], -1)
    m, n = mat.shape
    cap = cfg.rank_cap(diff.dim())
    use_exact, k = svd_plan(m, n, cfg, cap)
    if use_exact:
        svd = exact_svd(mat, k_max=min(cap, m, n))
    else:
        svd = randomized_svd(mat, k, cfg.oversample, cfg.lowrank_iters, generator)
    kk = min(cap, m, n)
    # Copies, not views: a view would keep the full-size LAPACK factors alive.
    return replace(svd, U=svd.U[:, :kk].to("cpu", torch.float32, copy=True).contiguous(),
                   S=svd.S.to("cpu", torch.float32, copy=True),
                   Vh=svd.Vh[:kk, :].to("cpu", torch.float32, copy=True).contiguous())


@dataclass
class Spectra:
    """What pass 1 learnt: each LoRA layer's cap factors and norm, and the fixed bytes."""

    kept: dict[str, tuple[TruncatedSVD, float]] = field(default_factory=dict)
    layers: list[LayerSpectrum] = field(default_factory=list)
    fixed_bytes: int = 0          # .diff / .diff_b tensors at the output dtype
    unchanged: int = 0            # changed layers left out under min_change_* (change_threshold.py)

    def curve(self) -> SizeCurve:
        return size_curve(self.layers, self.fixed_bytes)

    def release(self, key: str) -> None:
        """Drop a stored layer's cap factors (pass 2 keeps memory falling as it goes)."""
        self.kept.pop(key, None)


def collect_spectra(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig, plan: PairPlan,
                    fallback: OomFallback, generator_for: Callable[[str], torch.Generator], *,
                    progress: ProgressFn | None, check_interrupt: InterruptFn | None,
                    prefetch: int, total_steps: int) -> Spectra:
    """Pass 1: decompose every LoRA layer at its cap; count the bytes of the stored diffs."""
    out = Spectra()
    itemsize = torch.empty((), dtype=cfg.torch_dtype).element_size()

    def load(pair: KeyPair) -> tuple[torch.Tensor, float]:
        return fallback.call(pair.tuned_key, lambda dev: load_difference(
            base, tuned, pair.tuned_key, pair.base_key, dev))

    # A budget below the smallest possible file is refused now, not after every SVD.
    check_budget_fits(cfg, plan, load)
    out.fixed_bytes += new_tensor_bytes(plan, cfg, base)   # set_weight tensors (new_tensors.py)
    for i, (pair, (diff, fro)) in enumerate(Prefetcher(
            plan.common, load, prefetch, watch=RunWatch(check_interrupt),
            what="the next layer from the reader", cpu_compute=not fallback.on_accelerator)):
        if check_interrupt is not None:
            check_interrupt()
        if needs_svd(pair, fro, cfg, plan):
            svd = fallback.call(pair.tuned_key, lambda dev, d=diff, p=pair: decompose_at_cap(
                d if d.device == torch.device(dev) else d.to(dev), layer_config(cfg, p.path),
                generator_for(p.path)))
            out.kept[pair.tuned_key] = (svd, fro)
            out.layers.append(LayerSpectrum(pair.tuned_key, svd.S, fro * fro,
                                            rank_unit_bytes(pair.shape, itemsize),
                                            svd.U.shape[1]))
        elif stores_diff(pair, fro, cfg, plan):
            out.fixed_bytes += stored_diff_bytes(pair.shape, itemsize)
        elif small_change_reason(pair, fro, cfg, plan) is not None:
            out.unchanged += 1
        del diff
        if progress is not None:
            progress(i + 1, total_steps, pair.tuned_key)
    return out


def finisher(cfg: ExtractConfig, spectra: Spectra, ranks: dict[str, int]):
    """``finish(key, diff, fro)``: the stored factors of a layer at its allocated rank."""
    def finish(key: str, diff: torch.Tensor, fro: float):
        t0 = time.perf_counter()
        svd, _ = spectra.kept[key]     # kept until stored: an OOM retry on the CPU needs it
        dev = diff.device
        on = replace(svd, U=svd.U.to(dev), S=svd.S.to(dev), Vh=svd.Vh.to(dev))
        return finish_extraction(diff, on, ranks[key], fro, cfg, t0)
    return finish


def chosen_point(rank_plan: RankPlan) -> CurvePoint:
    """The budgeted file on the curve: the allocation's bytes and predicted errors."""
    o = rank_plan.outcome
    return CurvePoint(tensor_bytes=o.used_bytes, mean_rel_error=o.predicted_mean_rel_error,
                      rms_rel_error=o.predicted_rms_rel_error,
                      rank_min=min(rank_plan.ranks, default=0),
                      rank_max=max(rank_plan.ranks, default=0))


def allocate_ranks(cfg: ExtractConfig, spectra: Spectra) -> tuple[RankPlan, dict[str, int]]:
    plan = plan_ranks(spectra.layers, spectra.fixed_bytes, cfg.budget_bytes, cfg.size_objective)
    ranks = {x.key: r for x, r in zip(spectra.layers, plan.ranks, strict=True)}
    return plan, ranks


class BudgetPass:
    """Pass 1 and the allocation of a budgeted run; then ``finish`` serves pass 2 layer by layer.

    Shared by the V1 pipeline and the V2 manager (which runs pass 2 through its own streamer).
    """

    def __init__(self, base: WeightSource, tuned: WeightSource, cfg: ExtractConfig,
                 plan: PairPlan, generator_for: Callable[[str], torch.Generator], *,
                 fallback: OomFallback, progress: ProgressFn | None,
                 check_interrupt: InterruptFn | None, prefetch: int) -> None:
        self.total = len(plan.common)
        self.spectra = collect_spectra(base, tuned, cfg, plan, fallback, generator_for,
                                       progress=progress, check_interrupt=check_interrupt,
                                       prefetch=prefetch, total_steps=2 * self.total)
        self.curve = self.spectra.curve()
        self.rank_plan, self.ranks = allocate_ranks(cfg, self.spectra)
        self.finish = finisher(cfg, self.spectra, self.ranks)

    def second_pass_progress(self, progress: ProgressFn | None) -> ProgressFn | None:
        """Pass 2's ``progress(done, total, key)`` shown as the second half of the run."""
        if progress is None:
            return None
        return lambda done, total, key: progress(self.total + done, 2 * self.total, key)

    def annotate(self, report: ExtractionReport) -> None:
        """Budget, bytes used, threshold and the curve with the chosen point, into the report."""
        report.budget = self.rank_plan.outcome
        self.curve.chosen = chosen_point(self.rank_plan)
        report.size_curve = self.curve


def spectra_only(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig,
                 generator_for: Callable[[str], torch.Generator], *,
                 progress: ProgressFn | None = None, check_interrupt: InterruptFn | None = None,
                 prefetch: int = 2) -> tuple[Spectra, PairPlan]:
    """Pass 1 alone (the dry run): the spectra and the pairing, nothing written."""
    run = set_up_run(base, tuned, cfg)   # the key style decides what is stored
    cfg, plan = run.cfg, run.plan
    fallback = OomFallback(cfg.device)
    return collect_spectra(base, tuned, cfg, plan, fallback, generator_for, progress=progress,
                           check_interrupt=check_interrupt, prefetch=prefetch,
                           total_steps=len(plan.common)), plan
