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
from ..memory.options import MEMORY, MEMORY_OPTIONS
from ..memory.planner import MemoryOptions
from .option_flags import add_option_flags, config_values
from .progress import progress_bar
from .text_encoders import open_model

V2_KNOBS = tuple(o.name for o in MEMORY_OPTIONS)


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=AUTO, help=DEVICE_HELP)


def add_v2_options(p: argparse.ArgumentParser) -> None:
    """The LoraExtractV2 node's memory inputs. Giving any of them runs the V2 engine."""
    g = p.add_argument_group(
        "V2 block-swap manager (the LoraExtractV2 node; any of these selects it; same ranks and factors as V1)")
    g.add_argument("--v2", action="store_true", help="use the V2 engine with the mode's defaults")
    add_option_flags(g, MEMORY_OPTIONS)


def wants_v2(a: argparse.Namespace) -> bool:
    return bool(getattr(a, "v2", False)) or any(
        getattr(a, k, None) not in (None, False) for k in V2_KNOBS)


def memory_options(a: argparse.Namespace) -> MemoryOptions:
    """The node's ``MemoryOptions`` from the flags; unset knobs take the mode's defaults."""
    values = config_values(a, MEMORY_OPTIONS)
    values["mode"] = values["mode"] or MEMORY["vram_usage_mode"].default
    if values["memory_threshold"] is None:
        values["memory_threshold"] = MEMORY["memory_threshold"].default
    return MemoryOptions(**values).validate()


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
