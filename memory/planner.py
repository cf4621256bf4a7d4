"""The V2 memory policy: a pure function of sizes, free device memory and the chosen mode.

No torch device is touched here; the streamer and the manager carry the plan out. Sizes are
bytes of float32 differences (what the manager keeps on the device), so the same numbers serve
for the device budget and for host staging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .blocks import block_priority
from .modes import MODES
from .options import DEFAULT_MEMORY_THRESHOLD, MEMORY

# Device bytes one layer in compute needs beyond its difference: the stacked copy for the
# batched SVD and the factors / LAPACK workspace (measured peak ~2x the matrix for exact SVD).
COMPUTE_OVERHEAD = 2


@dataclass(frozen=True)
class BlockSize:
    name: str
    bytes: int


@dataclass(frozen=True)
class MemoryOptions:
    """The V2 knobs; None means "the mode's default"."""

    mode: str = "balanced"
    blocks_in_gpu: int | None = None
    batch_size: int | None = None
    prefetch_ahead: int | None = None
    memory_threshold: float = DEFAULT_MEMORY_THRESHOLD
    debug: bool = False

    def validate(self) -> MemoryOptions:
        MEMORY["vram_usage_mode"].check(self.mode)
        for name in ("blocks_in_gpu", "batch_size", "prefetch_ahead"):
            value = getattr(self, name)
            if value is not None:
                MEMORY[name].check(value)
        MEMORY["memory_threshold"].check(self.memory_threshold)
        return self


@dataclass
class MemoryPlan:
    """What stays on the device, how many layers go together, how far reading runs ahead."""

    mode: str
    budget_bytes: int | None          # device bytes the run may use; None without an accelerator
    resident: list[str] = field(default_factory=list)    # blocks kept on the device for the run
    offloaded: list[str] = field(default_factory=list)   # blocks streamed and dropped
    resident_bytes: int = 0
    batch_size: int = 1
    prefetch_ahead: int = 0           # batches read ahead of the one in compute
    max_batch_bytes: int = 0          # a batch never holds more difference bytes than this
    working_bytes: int = 0            # device bytes for batches in flight and in compute
    staging_bytes: int = 0            # host buffers for reading ahead (bounds host memory)
    notes: list[str] = field(default_factory=list)


def plan_memory(blocks: Sequence[BlockSize], largest_layer_bytes: int, free_bytes: int | None,
                opts: MemoryOptions) -> MemoryPlan:
    """Choose resident blocks, batch size and read-ahead for a run.

    ``free_bytes`` is the free device memory (after ComfyUI freed what it could), None on a
    machine without an accelerator: then nothing is resident (host memory is what streaming
    protects) and only batching and read-ahead apply.
    """
    mode = MODES[opts.mode]
    batch = opts.batch_size if opts.batch_size is not None else mode.batch_size
    ahead = opts.prefetch_ahead if opts.prefetch_ahead is not None else mode.prefetch_ahead
    keep = opts.blocks_in_gpu if opts.blocks_in_gpu is not None else mode.blocks_in_gpu
    notes: list[str] = []
    if mode.sequential:
        batch, keep = 1, 0
    largest = max(1, largest_layer_bytes)
    # Host staging: the batches read ahead plus the one in compute; never less than one layer.
    staging = (ahead + 2) * largest
    max_batch = max(largest, staging // (ahead + 1))
    plan = MemoryPlan(mode=opts.mode, budget_bytes=None, batch_size=batch, prefetch_ahead=ahead,
                      max_batch_bytes=max_batch, staging_bytes=staging, notes=notes)
    ordered = sorted(range(len(blocks)), key=lambda i: (block_priority(blocks[i].name), i))
    if free_bytes is None:
        plan.offloaded = [b.name for b in blocks]
        return plan
    budget = int(mode.budget_fraction * max(0, free_bytes))
    plan.budget_bytes = budget

    def working(batch_bytes: int, depth: int) -> int:
        return batch_bytes * (depth + 1 + COMPUTE_OVERHEAD)

    # Fit the working set first: fewer batches ahead, then smaller batches, down to one layer.
    while working(plan.max_batch_bytes, plan.prefetch_ahead) > budget:
        if plan.prefetch_ahead > 0:
            plan.prefetch_ahead -= 1
        elif plan.max_batch_bytes > largest:
            plan.max_batch_bytes = max(largest, plan.max_batch_bytes // 2)
        elif plan.batch_size > 1:
            plan.batch_size = 1
        else:
            notes.append(f"the largest layer needs {working(largest, 0) / 2**20:.0f} MiB of "
                         f"device memory but the budget is {budget / 2**20:.0f} MiB; running "
                         "anyway (layers that run out of memory are redone on the CPU).")
            break
    if (plan.batch_size, plan.prefetch_ahead) != (batch, ahead):
        notes.append(f"budget {budget / 2**20:.0f} MiB: batch {batch} -> {plan.batch_size}, "
                     f"read-ahead {ahead} -> {plan.prefetch_ahead} batches.")
    plan.working_bytes = working(plan.max_batch_bytes, plan.prefetch_ahead)
    room = budget - plan.working_bytes
    for i in ordered:
        b = blocks[i]
        if (keep is None or len(plan.resident) < keep) and b.bytes <= room:
            plan.resident.append(b.name)
            plan.resident_bytes += b.bytes
            room -= b.bytes
    kept = set(plan.resident)
    plan.offloaded = [b.name for b in blocks if b.name not in kept]
    return plan


def form_batches(sizes: Sequence[int], batch_size: int, max_batch_bytes: int) -> list[list[int]]:
    """Consecutive layer indices in batches of at most ``batch_size`` layers and
    ``max_batch_bytes`` bytes (a layer larger than that is a batch of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, size in enumerate(sizes):
        if current and (len(current) >= batch_size or used + size > max_batch_bytes):
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        batches.append(current)
    return batches


def shrink_batch(batch_size: int) -> int:
    """The batch size after a threshold or out-of-memory event: half, at least one."""
    return max(1, batch_size // 2)
