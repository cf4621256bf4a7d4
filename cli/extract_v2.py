"""``lora-extract extract`` options for the device and for the V2 block-swap manager.

Kept apart from ``main.py`` so the V2 knobs mirror the LoraExtractV2 node in one place: the
same names (``--vram-mode`` for ``vram_usage_mode`` ...), ranges, and the same engine call,
so the command line writes the same file as the node for the same settings.
"""

from __future__ import annotations

import argparse
import os

from ..extract import ExtractConfig
from ..extract.devices import AUTO, DEVICE_HELP
from ..extract.tempfiles import write_text_atomic
from ..memory.manager import extract_to_file_v2
from ..memory.planner import MAX_BATCH, MAX_BLOCKS, MAX_PREFETCH, MODES, MemoryOptions
from .progress import progress_bar
from .text_encoders import open_model

V2_KNOBS = ("vram_mode", "blocks_in_gpu", "batch_size", "prefetch_ahead", "memory_threshold",
            "memory_log")


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=AUTO, help=DEVICE_HELP)


def add_v2_options(p: argparse.ArgumentParser) -> None:
    """The LoraExtractV2 node's memory inputs. Giving any of them runs the V2 engine."""
    g = p.add_argument_group(
        "V2 block-swap manager (the LoraExtractV2 node; any of these selects it; same ranks and factors as V1)")
    g.add_argument("--v2", action="store_true", help="use the V2 engine with the mode's defaults")
    g.add_argument("--vram-mode", choices=tuple(MODES), default=None,
                   help="share of free VRAM the run may use: conservative ~50%% (sequential), "
                        "balanced ~75%% (default with --v2), aggressive ~90%%, maximum ~95%%")
    g.add_argument("--blocks-in-gpu", type=int, default=None, metavar="N",
                   help=f"model blocks kept on the GPU (0..{MAX_BLOCKS}; default: the mode's)")
    g.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help=f"layers per batch; same-shaped ones share one batched SVD on a GPU "
                        f"(1..{MAX_BATCH}; default: the mode's)")
    g.add_argument("--prefetch-ahead", type=int, default=None, metavar="N",
                   help=f"batches read and moved in the background (0..{MAX_PREFETCH}; "
                        "default: the mode's)")
    g.add_argument("--memory-threshold", type=float, default=None, metavar="SHARE",
                   help="used-VRAM share above which kept blocks are offloaded and batches "
                        "halved (0.5..0.95, default 0.85)")
    g.add_argument("--memory-log", action="store_true",
                   help="print the V2 memory log (budget, blocks kept, per-batch time and VRAM)")


def wants_v2(a: argparse.Namespace) -> bool:
    return bool(getattr(a, "v2", False)) or any(
        getattr(a, k, None) not in (None, False) for k in V2_KNOBS)


def memory_options(a: argparse.Namespace) -> MemoryOptions:
    """The node's ``MemoryOptions`` from the flags; unset knobs take the mode's defaults."""
    return MemoryOptions(
        mode=a.vram_mode or "balanced", blocks_in_gpu=a.blocks_in_gpu, batch_size=a.batch_size,
        prefetch_ahead=a.prefetch_ahead,
        memory_threshold=0.85 if a.memory_threshold is None else a.memory_threshold,
        debug=a.memory_log).validate()


def run_extract_v2(base_path: str, tuned_path: str, out: str, cfg: ExtractConfig,
                   opts: MemoryOptions, report_path: str | None, overwrite: bool = False,
                   text_encoders: bool = False) -> int:
    """Extract with the V2 manager (as LoraExtractV2 does), write the file, print the report."""
    base = open_model(base_path, text_encoders, "base model")
    tuned = open_model(tuned_path, text_encoders, "fine-tuned model")
    report, mem = extract_to_file_v2(base, tuned, cfg, opts, out, overwrite=overwrite,
                                     progress=progress_bar("extract v2"))
    if report_path:
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
        write_text_atomic(report_path, report.to_json())
    print(report.format_text())
    if opts.debug:
        print(mem.format_debug())
    return 0
