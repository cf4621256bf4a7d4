"""``lora-extract resize CHECKPOINT LORA... -o FOLDER``: base-model-aware LoRA compression.

Each LORA is a file or a weighted merge ``"a:0.7,b:0.3"``; every recipe of ``-r`` (separated by
``:``) writes one file named ``<lora>_<recipe>_th<threshold>.safetensors`` into FOLDER.
"""

from __future__ import annotations

import argparse
import logging

import torch

from ..resize import (
    DEFAULT_RECIPES,
    BaseModel,
    ResizeOptions,
    open_lora_input,
    parse_recipes,
    resize_lora,
)
from .progress import progress_bar

DTYPES = {"16": "fp16", "32": "fp32", "bf16": "bf16"}


def cmd_resize(a: argparse.Namespace) -> int:
    if a.resize_verbose:
        level = logging.INFO if a.resize_verbose == 1 else logging.DEBUG
        root = logging.getLogger()
        root.setLevel(min(level, root.getEffectiveLevel()))
    recipes = parse_recipes(a.score_recipes)   # bad recipes fail before any file is read
    opts = ResizeOptions(output_dtype=DTYPES[a.output_dtype], device=a.device,
                         overwrite=a.overwrite).validate()
    base = BaseModel.open(a.checkpoint)
    for spec in a.loras:
        lora = open_lora_input(spec)
        report = resize_lora(base, lora, recipes, a.output_folder, opts,
                             progress=progress_bar(f"resize {lora.name}"))
        print(report.format_text(per_layer=a.resize_verbose >= 2))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``resize`` subcommand on ``lora-extract``'s subparsers."""
    p = subparsers.add_parser("resize", help="compress LoRAs, scoring dimensions against the base model",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="base model checkpoint (.safetensors)")
    p.add_argument("loras", nargs="+", metavar="LORA", help="LoRA file, or a merge 'a:0.7,b:0.3'")
    add_common_options(p)
    p.add_argument("-v", "--verbose", dest="resize_verbose", action="count", default=0,
                   help="-v: thresholds and score quantiles; -vv: every layer")
    p.set_defaults(func=cmd_resize)
    return p


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Output folder, dtype, device, recipes and --overwrite (shared with ``merge``)."""
    p.add_argument("-o", "--output_folder", "--output-folder", dest="output_folder", required=True)
    p.add_argument("-t", "--output_dtype", "--output-dtype", dest="output_dtype",
                   choices=tuple(DTYPES), default="16", help="16 (fp16), 32 (fp32) or bf16")
    p.add_argument("-d", "--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-r", "--score_recipes", "--score-recipes", dest="score_recipes",
                   default=DEFAULT_RECIPES, help="recipes separated by ':', e.g. 'fro_ckpt=1,thr=-3.5' "
                                                 "or 'rank=32'")
    p.add_argument("--overwrite", action="store_true", help="replace output files of the same name")

