"""What V1 does with each layer: read its difference, extract it into the tensors and a report
entry; on accelerator out-of-memory, the same layer again on the CPU (``OomFallback``).

The retry is written here, around the call, rather than passed into the fallback as a callback:
the path from the layer loop to the decomposition then runs straight down (layer loop -> this
module -> pair output -> layer -> decomposition) and never comes back to a module it has left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ExtractConfig
from .oom_fallback import OOM_ERRORS, OomFallback
from .pair_output import process_pair
from .pairing import KeyPair, PairPlan, load_difference
from .report import LayerReport
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

    def load(self, pair: KeyPair) -> tuple[torch.Tensor, float]:
        """The float32 difference of ``pair`` and its norm (the prefetch thread calls this)."""
        device = self.fallback.first_device(pair.tuned_key)
        if device == "cpu":
            return self._difference(pair, device)
        try:
            return self._difference(pair, device)
        except OOM_ERRORS:
            pass  # retried below, outside the handler, so the failed attempt's tensors are freed
        return self._difference(pair, self.fallback.after_oom(pair.tuned_key, device))

    def process(self, pair: KeyPair, diff: torch.Tensor, fro: float) -> LayerReport:
        """Extract ``diff`` (read by ``load``) into the tensors; its report entry."""
        loaded_on = "cpu" if self.fallback.ran_on_cpu(pair.tuned_key) else self.fallback.requested
        device = self.fallback.first_device(pair.tuned_key, loaded_on)
        if device == "cpu":
            return self._extract(pair, diff, fro)
        try:
            return self._extract(pair, diff, fro)
        except OOM_ERRORS:
            pass
        # The failed attempt consumed the difference in place: read it again, on the CPU.
        del diff
        device = self.fallback.after_oom(pair.tuned_key, device)
        return self._extract(pair, *self._difference(pair, device))

    def _difference(self, pair: KeyPair, device: str) -> tuple[torch.Tensor, float]:
        return load_difference(self.base, self.tuned, pair.tuned_key, pair.base_key, device)

    def _extract(self, pair: KeyPair, diff: torch.Tensor, fro: float) -> LayerReport:
        def base_weight(dev: torch.device) -> torch.Tensor:
            return self.base.get(pair.base_key, dev, torch.float32)

        return process_pair(pair, diff, fro, self.cfg, self.plan, self.tensors,
                            base_weight=base_weight)
