"""The V1 streaming pipeline with a size budget: spectra pass, allocation, finishing pass."""

from __future__ import annotations

import time

from .budget_run import (
    InterruptFn,
    ProgressFn,
    allocate_ranks,
    chosen_point,
    collect_spectra,
    finisher,
    needs_svd,
    new_report,
)
from .config import ExtractConfig
from .oom_fallback import OomFallback
from .pairing import KeyPair, load_difference, plan_pair
from .pipeline import ExtractionResult, _layer_generator, finish_result, process_pair
from .prefetch import Prefetcher
from .report import LayerReport
from .sources import WeightSource


def extract_lora_budgeted(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig, *,
                          progress: ProgressFn | None = None,
                          check_interrupt: InterruptFn | None = None,
                          prefetch: int = 2) -> ExtractionResult:
    """``extract_lora`` for ``cfg.target_size_mb``: the best ranks whose tensors fit the budget."""
    cfg.validate()
    t0 = time.perf_counter()
    plan = plan_pair(base, tuned)
    report = new_report(cfg, plan)
    total = len(plan.common)
    fallback = OomFallback(cfg.device)
    spectra = collect_spectra(base, tuned, cfg, plan, fallback,
                              lambda path: _layer_generator(cfg, path), progress=progress,
                              check_interrupt=check_interrupt, prefetch=prefetch,
                              total_steps=2 * total)
    curve = spectra.curve()
    rank_plan, ranks = allocate_ranks(cfg, spectra)
    finish = finisher(cfg, spectra, ranks)
    tensors = {}

    def load(pair: KeyPair):
        return fallback.call(pair.tuned_key, lambda dev: load_difference(
            base, tuned, pair.tuned_key, pair.base_key, dev))

    def process(pair: KeyPair, diff, fro: float) -> LayerReport:
        loaded_on = "cpu" if fallback.ran_on_cpu(pair.tuned_key) else fallback.requested

        def work(dev: str) -> LayerReport:
            d, f = (diff, fro) if dev == loaded_on else load_difference(
                base, tuned, pair.tuned_key, pair.base_key, dev)
            ex = finish(pair.tuned_key, d, f) if needs_svd(pair, f, cfg, plan) else None
            return process_pair(pair, d, f, cfg, plan, tensors, extraction=ex)
        entry = fallback.call(pair.tuned_key, work, loaded_on)
        spectra.release(pair.tuned_key)
        return entry

    for i, (pair, (diff, fro)) in enumerate(Prefetcher(plan.common, load, prefetch)):
        if check_interrupt is not None:
            check_interrupt()
        report.add(process(pair, diff, fro))
        del diff
        if progress is not None:
            progress(total + i + 1, 2 * total, pair.tuned_key)
    if check_interrupt is not None:
        check_interrupt()
    report.notes.extend(fallback.notes())
    report.budget = rank_plan.outcome
    curve.chosen = chosen_point(rank_plan)
    report.size_curve = curve
    report.seconds = time.perf_counter() - t0
    return finish_result(cfg, report, tensors)
