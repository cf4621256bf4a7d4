"""The in-order storing step of a V2 run: one loaded layer and its factors into the output."""

from __future__ import annotations

import torch

from ..extract.callbacks import InterruptFn, ProgressFn
from ..extract.config import ExtractConfig
from ..extract.layer import LayerExtraction
from ..extract.pair_output import process_pair
from ..extract.pairing import PairPlan
from ..extract.report import ExtractionReport
from ..extract.waits import RunWatch
from .streamer import LoadedLayer


class LayerStore:
    """Stores layers in model order (the file has V1's keys in V1's order) and reports progress."""

    def __init__(self, cfg: ExtractConfig, plan: PairPlan, report: ExtractionReport,
                 progress: ProgressFn | None, check_interrupt: InterruptFn | None,
                 watch: RunWatch | None = None) -> None:
        self.cfg, self.plan, self.report = cfg, plan, report
        self.watch = watch
        self.progress, self.check_interrupt = progress, check_interrupt
        self.tensors: dict[str, torch.Tensor] = {}
        self.done = 0

    def __call__(self, layer: LoadedLayer, ex: LayerExtraction | None) -> None:
        """Store ``layer`` (``ex``: its factors, None when it is stored as is or skipped)."""
        try:
            if self.check_interrupt is not None and self.done:
                self.check_interrupt()
            stored_before = len(self.tensors)
            entry = process_pair(layer.pair, layer.diff, layer.fro, self.cfg, self.plan,
                                 self.tensors, extraction=ex)
            _own_stored_copies(self.tensors, stored_before, layer)
        finally:
            # Every path gives the buffer back: stored, skipped, zero-difference or failed.
            layer.release()
        # process_pair timed only the storing: add the decomposition's share.
        entry.seconds += ex.seconds if ex is not None else 0.0
        self.report.add(entry)
        self.done += 1
        if self.watch is not None:
            self.watch.progressed()
        if self.progress is not None:
            self.progress(self.done, len(self.plan.common), layer.pair.tuned_key)


def _own_stored_copies(tensors: dict[str, torch.Tensor], stored_before: int,
                       layer: LoadedLayer) -> None:
    """Copy stored tensors that still alias the layer's reused host buffer.

    A difference stored as is (``.diff``/``.diff_b``, or ``full``) in float32 is the buffer
    itself (``.to(float32)`` of a float32 tensor returns it), and the buffer is handed to the
    next layer once this one is released.
    """
    buf = layer.host_buffer
    if buf is None:
        return
    lo = buf.data_ptr()
    hi = lo + buf.numel()
    for key in list(tensors)[stored_before:]:
        t = tensors[key]
        if t.device.type == "cpu" and lo <= t.data_ptr() < hi:
            tensors[key] = t.clone()
