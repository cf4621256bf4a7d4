"""What V1 (and the size budget's second pass) does with each layer: read its difference,
extract it into the tensors and a report entry; on accelerator out-of-memory, the same layer
again on the CPU (``OomFallback``).

The retry is written here, around the call, rather than passed into the fallback as a callback:
the path from the layer loop to the decomposition then runs straight down (layer loop -> this
module -> pair output -> layer -> decomposition) and never comes back to a module it has left.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import ExtractConfig
from .difference_pool import DifferencePool
from .file_difference import ChunkBuffers
from .layer import LayerExtraction
from .oom_fallback import OOM_ERRORS, OomFallback
from .pair_output import process_pair
from .pairing import KeyPair, PairPlan, load_difference
from .report import STATUS_LORA, LayerReport
from .sources import WeightSource


@dataclass
class LayerWork:
    """Per-layer work of one V1 run; ``tensors`` collects the LoRA's tensors."""

    base: WeightSource
    tuned: WeightSource
    cfg: ExtractConfig
    plan: PairPlan
    fallback: OomFallback
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # The size budget's second pass: a layer's factors at its allocated rank from the first
    # pass's decomposition (None: decompose here), and what to release once it is stored.
    finish: Callable[[KeyPair, torch.Tensor, float], LayerExtraction | None] | None = None
    stored: Callable[[str], None] | None = None
    # CPU differences formed in recycled memory (``DifferencePool``), read through per-thread
    # chunk buffers (the reader thread, and this thread when a layer is read again).
    pool: DifferencePool = field(default_factory=lambda: DifferencePool(keep=2))
    _buffers: threading.local = field(default_factory=threading.local)

    def load(self, pair: KeyPair) -> tuple[torch.Tensor, float]:
        """The float32 difference of ``pair`` and its norm (the prefetch thread calls this)."""
        return self.fallback.call(pair.tuned_key, lambda dev: self._difference(pair, dev))

    def process(self, pair: KeyPair, diff: torch.Tensor, fro: float) -> LayerReport:
        """Extract ``diff`` (read by ``load``) into the tensors; its report entry."""
        with self.pool.using():
            entry = self._extract_with_fallback(pair, diff, fro)
        if self.stored is not None:
            self.stored(pair.tuned_key)
        if entry.status == STATUS_LORA:
            # Extracted into new factor tensors: the difference (now the residual) is free.
            self.pool.give_back(diff)
        return entry

    def _extract_with_fallback(self, pair: KeyPair, diff: torch.Tensor, fro: float) -> LayerReport:
        loaded_on = "cpu" if self.fallback.ran_on_cpu(pair.tuned_key) else self.fallback.requested
        device = self.fallback.first_device(pair.tuned_key, loaded_on)
        if device == "cpu":
            return self._extract(pair, diff, fro)
        try:
            return self._extract(pair, diff, fro)
        except OOM_ERRORS:
            pass  # retried below, outside the handler, so the failed attempt's tensors are freed
        # The failed attempt consumed the difference in place: read it again, on the CPU.
        del diff
        device = self.fallback.after_oom(pair.tuned_key, device)
        return self._extract(pair, *self._difference(pair, device))

    def _difference(self, pair: KeyPair, device: str) -> tuple[torch.Tensor, float]:
        buffers = getattr(self._buffers, "chunks", None)
        if buffers is None:
            buffers = self._buffers.chunks = ChunkBuffers()
        return load_difference(self.base, self.tuned, pair.tuned_key, pair.base_key, device,
                               self.pool, buffers)

    def _extract(self, pair: KeyPair, diff: torch.Tensor, fro: float) -> LayerReport:
        def base_weight(dev: torch.device) -> torch.Tensor:
            return self.base.get(pair.base_key, dev, torch.float32)

        extraction = self.finish(pair, diff, fro) if self.finish is not None else None
        return process_pair(pair, diff, fro, self.cfg, self.plan, self.tensors, extraction,
                            base_weight=base_weight)
