"""The V1 streaming pipeline with a size budget: spectra pass, allocation, finishing pass."""

from __future__ import annotations

import time

from ..config import ExtractConfig
from ..keys.diffusers_keys import resolve_for_plan
from ..new_tensors import store_new_tensors
from ..oom_fallback import OomFallback
from ..pairing import KeyPair, load_difference
from ..pipeline import (
    ExtractionResult,
    _layer_generator,
    finish_result,
    needs_svd,
    new_report,
    process_pair,
    run_layers,
)
from ..plan_options import plan_for
from ..report import LayerReport
from ..sources import WeightSource
from .passes import (
    BudgetPass,
    InterruptFn,
    ProgressFn,
)


def extract_lora_budgeted(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig, *,
                          progress: ProgressFn | None = None,
                          check_interrupt: InterruptFn | None = None,
                          prefetch: int = 2) -> ExtractionResult:
    """``extract_lora`` for ``cfg.target_size_mb``: the best ranks whose tensors fit the budget."""
    cfg.validate()
    t0 = time.perf_counter()
    plan = plan_for(base, tuned, cfg)
    cfg, style_notes = resolve_for_plan(cfg, plan)
    report = new_report(cfg, plan, style_notes)
    total = len(plan.common)
    fallback = OomFallback(cfg.device)
    budget = BudgetPass(base, tuned, cfg, plan, lambda path: _layer_generator(cfg, path),
                        fallback=fallback, progress=progress, check_interrupt=check_interrupt,
                        prefetch=prefetch)
    progress = budget.second_pass_progress(progress)
    tensors = {}

    def load(pair: KeyPair):
        return fallback.call(pair.tuned_key, lambda dev: load_difference(
            base, tuned, pair.tuned_key, pair.base_key, dev))

    def process(pair: KeyPair, diff, fro: float) -> LayerReport:
        loaded_on = "cpu" if fallback.ran_on_cpu(pair.tuned_key) else fallback.requested

        def work(dev: str) -> LayerReport:
            d, f = (diff, fro) if dev == loaded_on else load_difference(
                base, tuned, pair.tuned_key, pair.base_key, dev)
            ex = budget.finish(pair.tuned_key, d, f) if needs_svd(pair, f, cfg, plan) else None
            return process_pair(pair, d, f, cfg, plan, tensors, extraction=ex)
        entry = fallback.call(pair.tuned_key, work, loaded_on)
        budget.spectra.release(pair.tuned_key)
        return entry

    run_layers(plan.common, load, process, report, prefetch=prefetch, progress=progress,
               check_interrupt=check_interrupt, total=total)
    report.notes.extend(fallback.notes())
    store_new_tensors(plan, base, tuned, cfg, tensors, report)
    budget.annotate(report)
    report.seconds = time.perf_counter() - t0
    return finish_result(cfg, report, tensors)
