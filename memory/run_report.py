"""What the V2 manager did with memory in one run: typed, and as the debug text of the node."""

from __future__ import annotations

from dataclasses import dataclass, field

from .monitor import VramReading, format_reading
from .planner import MemoryOptions, MemoryPlan


@dataclass
class BatchRecord:
    """One loaded batch: its layers, the seconds from its arrival until its layers were
    decomposed and stored (GPU schedule) or handed to the workers, storing older layers to
    keep the window (CPU schedule), and the device memory reading after it."""

    layers: int
    seconds: float
    vram: VramReading | None


@dataclass
class MemoryRunReport:
    options: MemoryOptions
    plan: MemoryPlan
    device: str
    initial_vram: VramReading | None = None
    final_vram: VramReading | None = None
    batches: list[BatchRecord] = field(default_factory=list)
    threshold_events: list[str] = field(default_factory=list)
    oom_events: list[str] = field(default_factory=list)
    cache_hits: int = 0           # layers taken from the resident cache (not read or moved)
    cached_layers: int = 0        # layers kept resident for later runs
    bytes_moved: int = 0          # difference bytes read and moved this run
    batched_svd: bool = False
    cpu_workers: int = 1          # CPU: layers of a batch extracted side by side
    seconds: float = 0.0
    saved_path: str | None = None

    def notes(self) -> list[str]:
        """Lines for the extraction report: what happened that the user should know."""
        out = list(self.oom_events)
        if self.threshold_events:
            out.append(f"device memory passed {self.options.memory_threshold:.0%} "
                       f"{len(self.threshold_events)} time(s): resident blocks were offloaded and "
                       "batches made smaller.")
        out.extend(self.plan.notes)
        return out

    def format_debug(self) -> str:
        """The debug block of the node (and ``-v`` on the command line)."""
        p, o = self.plan, self.options
        budget = "n/a" if p.budget_bytes is None else f"{p.budget_bytes / 2**30:.2f} GiB"
        bar = "=" * 60
        lines = [
            bar, "LoraExtractV2 - block-swap extraction",
            f"VRAM mode: {o.mode} (budget {budget}, device {self.device})",
            f"Blocks in GPU: {len(p.resident)} kept, {len(p.offloaded)} offloaded "
            f"({p.resident_bytes / 2**20:.0f} MiB resident)",
            f"Batch size: {p.batch_size} (batched SVD {'on' if self.batched_svd else 'off'}, "
            f"{self.cpu_workers} CPU layer worker(s)), read-ahead: {p.prefetch_ahead} batches",
            f"Memory threshold: {100 * o.memory_threshold:.1f}%",
            f"Initial VRAM: {format_reading(self.initial_vram)}",
            bar,
        ]
        lines.extend(f"note: {n}" for n in p.notes)
        for i, b in enumerate(self.batches):
            lines.append(f"batch {i + 1}: {b.layers} layers in {b.seconds:.2f}s, "
                         f"VRAM: {format_reading(b.vram)}")
        lines.extend(self.threshold_events)
        lines.extend(self.oom_events)
        lines += [
            bar,
            f"Extraction completed in {self.seconds:.2f} seconds",
            f"Layers from the resident cache: {self.cache_hits}; kept resident: {self.cached_layers}; "
            f"moved: {self.bytes_moved / 2**30:.2f} GiB",
            f"Final VRAM: {format_reading(self.final_vram)}",
        ]
        if self.saved_path:
            lines.append(f"LoRA saved to: {self.saved_path}")
        lines.append(bar)
        return "\n".join(lines)
