"""The loop of a size-budget run: the spectra pass, the allocation, then the finishing pass
(the passes are ``passes.py``, the rank math ``rank_math.py``)."""

from __future__ import annotations

import time

from ..callbacks import InterruptFn, ProgressFn
from ..config import ExtractConfig
from ..layer_loop import run_layers
from ..new_tensors import store_new_tensors
from ..oom_fallback import OomFallback
from ..pair_output import layer_generator, needs_svd, process_pair
from ..pairing import KeyPair, load_difference
from ..report import LayerReport
from ..result import ExtractionResult, finish_result
from ..run_setup import set_up_run
from ..sources import WeightSource
from .passes import BudgetPass


def extract_lora_budgeted(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig, *,
                          progress: ProgressFn | None = None,
                          check_interrupt: InterruptFn | None = None,
                          prefetch: int = 2) -> ExtractionResult:
    """``extract_lora`` for ``cfg.target_size_mb``: the best ranks whose tensors fit the budget."""
    t0 = time.perf_counter()
    run = set_up_run(base, tuned, cfg)
    cfg, plan, report = run.cfg, run.plan, run.report
    total = len(plan.common)
    fallback = OomFallback(cfg.device)
    budget = BudgetPass(base, tuned, cfg, plan, lambda path: layer_generator(cfg, path),
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
