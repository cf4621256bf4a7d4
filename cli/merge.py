"""``lora-extract merge CHECKPOINT LORA:W LORA:W... -o FOLDER -r RECIPES``: several LoRAs into one.

The resize engine with several inputs: the weighted LoRAs (LoKr, LoHa, DoRA and full-difference
files too, any key style) are summed layer by layer and the sum is cut by the recipes (``rank=32``,
``size=64``, ``fro_ckpt=1,thr=-3.5``...); one file per recipe.
"""

from __future__ import annotations

import argparse

from ..extract.errors import ExtractionInputError
from ..resize import ResizeOptions, open_lora_input, parse_recipes, resize_lora
from .help_format import DefaultsHelpFormatter
from .output_checks import check_output_folder
from .progress import progress_bar
from .resize import DTYPES, EXAMPLES, add_common_options, open_base_model


def cmd_merge(a: argparse.Namespace) -> int:
    if len(a.loras) < 2:
        raise ExtractionInputError(
            "merge needs at least two LoRAs (LORA:WEIGHT ...); to convert or resize one, use resize.")
    if not (a.score_recipes and a.score_recipes.strip()):
        # As for resize: no fixed cut suits every merge; say what to pass instead.
        raise ExtractionInputError(
            "no score recipe: pass -r, e.g. -r 'rank=32' (each layer's best 32 dimensions of the "
            "weighted sum), -r 'fro_ckpt=1,size=64' (the best dimensions that fit 64 MiB) or "
            "-r 'fro_ckpt=1,thr=-3.5'. See 'lora-extract merge --help'.")
    recipes = parse_recipes(a.score_recipes)   # bad recipes fail before any file is read
    opts = ResizeOptions(output_dtype=DTYPES[a.output_dtype], device=a.device,
                         overwrite=a.overwrite).validate()
    lora = open_lora_input(",".join(a.loras), block_weights=a.block_weights or "")
    if a.name:
        lora.name = a.name
    check_output_folder(a.output_folder, "-o")
    base = open_base_model(a)
    report = resize_lora(base, lora, recipes, a.output_folder, opts,
                         progress=progress_bar(f"merge {lora.name}"))
    print(report.format_text(per_layer=a.merge_verbose >= 1))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``merge`` subcommand on ``lora-extract``'s subparsers."""
    p = subparsers.add_parser("merge", help="merge weighted LoRAs into one at a rank, size or threshold",
                              description=__doc__.splitlines()[0].replace("``", ""),
                              epilog=EXAMPLES, formatter_class=DefaultsHelpFormatter)
    p.add_argument("checkpoint", help="base model checkpoint (.safetensors)")
    p.add_argument("loras", nargs="+", metavar="LORA[:WEIGHT]", help="two or more LoRA files, weight default 1")
    add_common_options(p)
    p.add_argument("--block-weights", "--block_weights", dest="block_weights", default=None,
                   metavar="SPEC",
                   help="per-block weights '[N:]PATTERN=W; ...' (glob or re:REGEX over layer names; "
                        "N: only the N-th LoRA)")
    p.add_argument("--name", default=None, metavar="STEM", help="output file name stem (default: the members and weights)")
    p.add_argument("-v", "--verbose", dest="merge_verbose", action="count", default=0,
                   help="-v: every layer's rank and error")
    p.set_defaults(func=cmd_merge)
    return p
