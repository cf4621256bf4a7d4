"""The V2 engine's memory options, declared once (see ``extract/option_spec.py``).

The LoraExtractV2 node adds these after LoraExtract's required inputs, in this order; the
``lora-extract extract`` flags (any of them selects the V2 engine) and ``MemoryOptions.validate``
read the same entries. On the command line an unset knob means "the mode's default", so the
flags default to ``None`` where the node shows the balanced mode's value.
"""

from __future__ import annotations

from ..extract.option_spec import Option, by_name
from .modes import MAX_BATCH, MAX_BLOCKS, MAX_PREFETCH, MODES

DEFAULT_MEMORY_THRESHOLD = 0.85

MEMORY_OPTIONS: tuple[Option, ...] = (
    Option("vram_usage_mode", "choice", "balanced", choices=tuple(MODES), flag="--vram-mode",
           cli_default=None, field="mode",
           tooltip="Share of free VRAM the run may use: conservative ~50% (one layer at a time, "
                   "nothing kept), balanced ~75%, aggressive ~90%, maximum ~95% (every block that "
                   "fits stays). Results are identical in every mode.",
           doc="share of free VRAM the run may use: conservative ~50% (sequential), balanced "
               "~75% (default with --v2), aggressive ~90%, maximum ~95%"),
    Option("blocks_in_gpu", "int", 10, min=0, max=MAX_BLOCKS, step=1, flag="--blocks-in-gpu",
           metavar="N", cli_default=None,
           tooltip="Model blocks kept on the GPU for the session (middle, output, input, then "
                   "others), so a second extraction from the same models does not move them "
                   "again.",
           doc=f"model blocks kept on the GPU (0..{MAX_BLOCKS}; default: the mode's)"),
    Option("batch_size", "int", 4, min=1, max=MAX_BATCH, step=1, flag="--batch-size",
           metavar="N", cli_default=None,
           tooltip="Layers processed together; same-shaped layers share one batched SVD on the "
                   "GPU (no gain on a CPU).",
           doc=f"layers per batch; same-shaped ones share one batched SVD on a GPU "
               f"(1..{MAX_BATCH}; default: the mode's)"),
    Option("prefetch_ahead", "int", 2, min=0, max=MAX_PREFETCH, step=1, flag="--prefetch-ahead",
           metavar="N", cli_default=None,
           tooltip="Batches read and transferred in the background while the current one is "
                   "decomposed.",
           doc=f"batches read and moved in the background (0..{MAX_PREFETCH}; default: the "
               "mode's)"),
    Option("memory_threshold", "float", DEFAULT_MEMORY_THRESHOLD, min=0.5, max=0.95, step=0.01,
           flag="--memory-threshold", metavar="SHARE", cli_default=None,
           tooltip="When used VRAM passes this share, kept blocks are offloaded and batches made "
                   "smaller.",
           doc=f"used-VRAM share above which kept blocks are offloaded and batches halved "
               f"(0.5..0.95, default {DEFAULT_MEMORY_THRESHOLD:g})"),
    Option("debug_mode", "bool", False, flag="--memory-log", field="debug",
           tooltip="Add the memory log (budget, blocks kept, per-batch time and VRAM, threshold "
                   "events) to the report.",
           doc="print the V2 memory log (budget, blocks kept, per-batch time and VRAM)"),
)

MEMORY = by_name(MEMORY_OPTIONS)
