"""The layer loop of V1 and of the size budget's second pass."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .callbacks import InterruptFn, ProgressFn
from .pairing import KeyPair
from .prefetch import Prefetcher
from .report import ExtractionReport, LayerReport
from .waits import RunWatch


def run_layers(pairs: list[KeyPair], load: Callable[[KeyPair], tuple[torch.Tensor, float]],
               process: Callable[[KeyPair, torch.Tensor, float], LayerReport],
               report: ExtractionReport, *, prefetch: int, progress: ProgressFn | None,
               check_interrupt: InterruptFn | None, total: int, cpu_compute: bool) -> None:
    """The V1 layer loop: read ahead, check the interrupt between layers, process each
    difference into the report, report progress; the difference is dropped before the next.
    ``cpu_compute``: the layers are extracted on the CPU (the reader then uses one thread)."""
    layers = Prefetcher(pairs, load, prefetch, watch=RunWatch(check_interrupt),
                        what="the next layer from the reader", cpu_compute=cpu_compute)
    for i, (pair, (diff, fro)) in enumerate(layers):
        if check_interrupt is not None:
            check_interrupt()
        report.add(process(pair, diff, fro))
        del diff
        if progress is not None:
            progress(i + 1, total, pair.tuned_key)
    if check_interrupt is not None:
        check_interrupt()
