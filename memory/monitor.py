"""Device memory readings and the threshold check of the V2 manager.

The reading comes from a probe (ComfyUI's model management in the node, ``torch.cuda`` on the
command line), so the policy is testable with made-up numbers and reads "n/a" without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# probe() -> (free_bytes, total_bytes), or None when there is no accelerator.
VramProbe = Callable[[], "tuple[int, int] | None"]


@dataclass(frozen=True)
class VramReading:
    free: int
    total: int

    @property
    def used_fraction(self) -> float:
        return 1.0 - self.free / self.total if self.total > 0 else 0.0


def format_reading(r: VramReading | None) -> str:
    if r is None:
        return "n/a"
    return f"{100 * r.used_fraction:.1f}% ({(r.total - r.free) / 2**30:.2f}/{r.total / 2**30:.2f} GiB)"


def torch_probe(device: str | torch.device) -> VramProbe:
    """Free/total memory of a CUDA device for this process; None for other devices.

    Free is what the driver reports plus what torch's caching allocator holds without a live
    tensor in it (ComfyUI's ``get_free_memory`` counts the same way): that memory is ours to
    reuse, and counting it as used would let the allocator's cache alone pass the threshold
    after a few batches and offload resident blocks for nothing.
    """
    dev = torch.device(device)

    def probe() -> tuple[int, int] | None:
        if dev.type != "cuda" or not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free) + max(0, int(cached)), int(total)
    return probe


class VramMonitor:
    """Reads the probe and says when used memory passes ``threshold`` (a fraction)."""

    def __init__(self, probe: VramProbe, threshold: float) -> None:
        self.probe = probe
        self.threshold = threshold

    def read(self) -> VramReading | None:
        got = self.probe()
        return None if got is None else VramReading(*got)

    def over(self, reading: VramReading | None) -> bool:
        return reading is not None and reading.used_fraction > self.threshold
