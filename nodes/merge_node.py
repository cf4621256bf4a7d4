"""The LoraMerge node: several weighted LoRAs into one, by the resize engine."""

from __future__ import annotations

import logging
import os
from functools import partial

from ..extract.errors import ExtractionInputError
from ..extract.options import EXTRACT
from ..resize import ResizeOptions, open_lora_input, parse_recipes
from . import comfy_adapter as comfy
from .comfy_io import io, option_input, unique_id
from .extract_node import CATEGORY
from .file_inputs import listed_file
from .resize_node import (
    MERGE_FIX,
    NONE,
    base_model_inputs,
    open_base_model,
    output_inputs,
    resize_outputs,
    run_resize,
)

log = logging.getLogger(__name__)

DEFAULT_MERGE_RECIPE = "rank=32"


class LoraMerge(io.ComfyNode):
    """Sum weighted LoRAs (LoKr, LoHa, DoRA, full differences too) and cut the sum to a rank or size."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraMerge",
            display_name="LoRA Merge (weighted, to a rank or size)",
            category=CATEGORY,
            description=("Merges several LoRAs into one: the weighted sum of their changes, layer "
                         "by layer (any key style, LoKr/LoHa/DoRA/full-difference files "
                         "converted), cut by score recipes to a rank, a size or a threshold. One "
                         "file per recipe."),
            inputs=[
                io.String.Input(
                    "loras", default="", multiline=True,
                    tooltip="The LoRAs to merge, one 'name:weight' per line or comma (names as "
                            "the loras folder lists them; weight default 1, may be negative)."),
                io.String.Input(
                    "score_recipes", default=DEFAULT_MERGE_RECIPE,
                    tooltip="How to cut the sum, recipes separated by ':'. rank=N (fixed rank), "
                            "size=MiB or thr=X with methods as in LoRA Resize. E.g. "
                            "rank=32:fro_ckpt=1,size=64"),
                *output_inputs(),
                io.String.Input(
                    "block_weights", default="", multiline=True, optional=True,
                    tooltip="Per-block weights, '[N:]PATTERN=WEIGHT' per line or ';': glob (or "
                            "re:REGEX) over layer names; N limits it to the N-th LoRA. E.g. "
                            "'input_blocks.*=0.5' or '2:*.attn2.*=0'."),
                *base_model_inputs(),
                io.String.Input("name", default="", optional=True,
                                tooltip="Output file name stem (default: members and weights)."),
                option_input(EXTRACT["save_to"]),
            ],
            outputs=resize_outputs("What was merged and kept per recipe: ranks, errors, "
                                   "converted layers."),
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, loras: str, score_recipes: str, output_dtype: str, device: str,
                verbose: bool, block_weights: str = "", model=None, ckpt_name: str = NONE,
                unet_name: str = NONE, name: str = "", save_to: str = "output") -> io.NodeOutput:
        recipes = parse_recipes(score_recipes)
        spec = ",".join(p.strip() for p in loras.replace("\n", ",").split(",") if p.strip())
        if not spec:
            raise ExtractionInputError(f"loras is empty; {MERGE_FIX}")
        dev = str(comfy.compute_device()) if device == "default" else "cpu"
        opts = ResizeOptions(output_dtype=output_dtype, device=dev).validate()
        resolve = partial(listed_file, "merge member", fix=MERGE_FIX, optional_suffix=".safetensors")
        lora = open_lora_input(spec, resolve=resolve, block_weights=block_weights)
        if name.strip():
            lora.name = name.strip()
        base = open_base_model(model, ckpt_name, unet_name)
        folder = (comfy.loras_directory() if save_to == "models/loras"
                  else os.path.join(comfy.output_directory(), "loras"))
        report = run_resize(base, lora, recipes, folder, opts, unique_id(cls))
        text = report.format_text(per_layer=verbose)
        log.info("LoRA merge finished:\n%s", text)
        return io.NodeOutput("\n".join(report.output_paths), text, ui={"text": [text]})
