"""``lora-extract extract`` options for the device and for the streamed (block-swap) engine.

Kept apart from ``main.py`` so the memory knobs mirror the LoraExtractV2 node in one place: the
same names (``--vram-mode`` for ``vram_usage_mode`` ...), ranges, and the same engine call,
so the command line writes the same file as the node for the same settings.
"""

from __future__ import annotations

import argparse
import os

from ..extract import ExtractConfig
from ..extract.devices import AUTO, DEVICE_HELP
from ..extract.tempfiles import write_text_atomic
from ..memory.options import MEMORY, MEMORY_OPTIONS
from ..memory.planner import MemoryOptions
from ..memory.streamed_extract import extract_to_file_streamed
from .option_flags import add_option_flags, config_values
from .progress import progress_bar
from .text_encoders import open_model

MEMORY_KNOBS = tuple(o.name for o in MEMORY_OPTIONS)


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=AUTO, help=DEVICE_HELP)


def add_memory_options(p: argparse.ArgumentParser) -> None:
    """The LoraExtractV2 node's memory inputs. Giving any of them runs the streamed engine."""
    g = p.add_argument_group(
        "Streamed block-swap engine (the LoraExtractV2 node; any of these selects it; same ranks "
        "and factors as LoraExtract)")
    # --v2 names the node it mirrors; --streamed names what the engine does. Both stay.
    g.add_argument("--v2", "--streamed", dest="streamed", action="store_true",
                   help="use the streamed engine (LoraExtractV2) with the mode's defaults")
    add_option_flags(g, MEMORY_OPTIONS)


def wants_streamed(a: argparse.Namespace) -> bool:
    return bool(getattr(a, "streamed", False)) or any(
        getattr(a, k, None) not in (None, False) for k in MEMORY_KNOBS)


def memory_options(a: argparse.Namespace) -> MemoryOptions:
    """The node's ``MemoryOptions`` from the flags; unset knobs take the mode's defaults."""
    values = config_values(a, MEMORY_OPTIONS)
    values["mode"] = values["mode"] or MEMORY["vram_usage_mode"].default
    if values["memory_threshold"] is None:
        values["memory_threshold"] = MEMORY["memory_threshold"].default
    return MemoryOptions(**values).validate()


def run_extract_streamed(base_path: str, tuned_path: str, out: str, cfg: ExtractConfig,
                         opts: MemoryOptions, report_path: str | None, overwrite: bool = False,
                         text_encoders: bool = False) -> int:
    """Extract with the streamed engine (as LoraExtractV2 does), write the file, print the report."""
    base = open_model(base_path, text_encoders, "base model")
    tuned = open_model(tuned_path, text_encoders, "fine-tuned model")
    report, mem = extract_to_file_streamed(base, tuned, cfg, opts, out, overwrite=overwrite,
                                           progress=progress_bar("extract streamed"))
    if report_path:
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
        write_text_atomic(report_path, report.to_json())
    print(report.format_text())
    if opts.debug:
        print(mem.format_debug())
    return 0
