"""``lora-extract resize CHECKPOINT LORA... -r RECIPE -o FOLDER``: base-model-aware LoRA compression.

Each LORA is a file or a weighted merge ``"a:0.7,b:0.3"``; every recipe of ``-r`` (separated by
``:``) writes one file named ``<lora>_<recipe>_th<threshold>.safetensors`` into FOLDER.

There is no default recipe: the right cut depends on what the user wants (a file size, or a
quality level against the base model), and any fixed threshold keeps everything of a strong
LoRA (an extracted one) while cutting a weak one to nothing. ``-r`` is required; its error
shows examples, one sized from the LoRA given.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from ..extract.errors import ExtractionInputError
from ..extract.formats.dispatch import open_source
from ..resize import (
    BaseModel,
    ResizeOptions,
    open_lora_input,
    parse_recipes,
    resize_lora,
)
from ..resize.output import output_file_name
from .help_format import DefaultsHelpFormatter
from .output_checks import check_output_folder, same_file
from .progress import progress_bar
from .text_encoders import refuse_lora_as_model

DTYPES = {"16": "fp16", "32": "fp32", "bf16": "bf16"}
MIB = 1 << 20

EXAMPLES = """\
recipes (-r; several separated by ':' write one file each):
  fro_ckpt=1,size=16        the best dimensions that fit 16 MiB, scored against the base layers
  fro_ckpt=1,thr=-2.5       keep dimensions whose singular value is at least 10**-2.5 of the base
                            layer's Frobenius norm
  spn_ckpt=0.8,params=0.2,size=32:fro_lora=1,thr=-1.5
                            two files; fro_lora scores against the LoRA layer itself
  rank=32                   each layer's best 32 dimensions (also a cap beside thr= or size=)
methods: fro_ckpt, spn_ckpt, fro_lora, spn_lora, subspace, params; then thr=X, size=MiB or
rank=N; optional rescale=Z. The report prints score quantiles to pick thr from.
"""


def _missing_recipe(loras) -> ExtractionInputError:
    """No ``-r``: examples, one sized at half the first LoRA's file."""
    first = loras[0]
    size = sum(os.path.getsize(f.path) for f, _w in first.members) / MIB
    return ExtractionInputError(
        f"no score recipe: pass -r, e.g. -r 'fro_ckpt=1,size={max(size / 2, 0.01):.3g}' (half "
        f"of {first.name}'s {size:.3g} MiB) or -r 'fro_ckpt=1,thr=-2.5' (the report's score "
        "quantiles help pick thr). There is no default: what to cut depends on whether you want a "
        "size or a quality level. See 'lora-extract resize --help' for more recipes.")


def _check_inputs_and_outputs(a: argparse.Namespace, loras, recipes) -> None:
    """Output folder and the names known before any work (threshold recipes)."""
    check_output_folder(a.output_folder, "-o")
    inputs = [a.checkpoint, *(f.path for lora in loras for f, _w in lora.members)]
    for lora in loras:
        for recipe in recipes:
            if recipe.threshold is None:
                continue   # a size recipe's name holds the threshold it finds: checked on write
            path = os.path.join(a.output_folder, output_file_name(lora.name, recipe, recipe.threshold))
            for inp in inputs:
                if os.path.exists(path) and same_file(path, inp):
                    raise ExtractionInputError(
                        f"the output {path} would replace an input ({inp}); choose another -o "
                        "folder.")
            if os.path.lexists(path) and not a.overwrite:
                raise ExtractionInputError(
                    f"{path} already exists; pass --overwrite to replace it, or choose another "
                    "-o folder.")


def open_base_model(a: argparse.Namespace) -> BaseModel:
    """CHECKPOINT as the base model (refused when it is a LoRA), norms cached in --cache-dir."""
    source = open_source(a.checkpoint)
    refuse_lora_as_model(source, a.checkpoint, "base model (CHECKPOINT comes first, then the "
                                               "LoRAs)")
    return BaseModel(source, a.checkpoint, a.cache_dir)


def cmd_resize(a: argparse.Namespace) -> int:
    if a.resize_verbose:
        level = logging.INFO if a.resize_verbose == 1 else logging.DEBUG
        root = logging.getLogger()
        root.setLevel(min(level, root.getEffectiveLevel()))
    given = bool(a.score_recipes and a.score_recipes.strip())
    recipes = parse_recipes(a.score_recipes) if given else []  # bad recipes: before any read
    opts = ResizeOptions(output_dtype=DTYPES[a.output_dtype], device=a.device,
                         overwrite=a.overwrite).validate()
    loras = [open_lora_input(spec) for spec in a.loras]
    if not given:
        raise _missing_recipe(loras)
    _check_inputs_and_outputs(a, loras, recipes)
    base = open_base_model(a)
    for lora in loras:
        report = resize_lora(base, lora, recipes, a.output_folder, opts,
                             progress=progress_bar(f"resize {lora.name}"))
        print(report.format_text(per_layer=a.resize_verbose >= 2))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``resize`` subcommand on ``lora-extract``'s subparsers."""
    p = subparsers.add_parser("resize", help="compress LoRAs, scoring dimensions against the base model",
                              description=__doc__.splitlines()[0].replace("``", ""),
                              epilog=EXAMPLES, formatter_class=DefaultsHelpFormatter)
    p.add_argument("checkpoint", help="base model checkpoint (.safetensors)")
    p.add_argument("loras", nargs="+", metavar="LORA", help="LoRA file, or a merge 'a:0.7,b:0.3'")
    add_common_options(p)
    p.add_argument("-v", "--verbose", dest="resize_verbose", action="count", default=0,
                   help="-v: thresholds and score quantiles; -vv: every layer")
    p.set_defaults(func=cmd_resize)
    return p


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Output folder, recipes, dtype, device, --overwrite and --cache-dir (shared with ``merge``)."""
    p.add_argument("-o", "--output_folder", "--output-folder", dest="output_folder", required=True,
                   metavar="FOLDER", help="folder for the output files (created if missing)")
    p.add_argument("-r", "--score_recipes", "--score-recipes", dest="score_recipes", default=None,
                   metavar="RECIPES", help="required: recipes separated by ':' (examples below)")
    p.add_argument("-t", "--output_dtype", "--output-dtype", dest="output_dtype",
                   choices=tuple(DTYPES), default="16", help="16 (fp16), 32 (fp32) or bf16")
    p.add_argument("-d", "--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the SVDs run")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files of the same name (never an input)")
    # No default value here: it depends on the environment, and --help (and the generated
    # reference) must read the same on every machine; BaseModel resolves it at run time.
    p.add_argument("--cache-dir", default=None, metavar="FOLDER",
                   help="where base-model norms are cached (default: $LORA_EXTRACT_CACHE_DIR, "
                        "else $XDG_CACHE_HOME/lora-extract, else ~/.cache/lora-extract)")
