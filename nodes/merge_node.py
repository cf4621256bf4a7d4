"""The LoraMerge node: several weighted LoRAs into one, by the resize engine."""

from __future__ import annotations

import logging
import os
from functools import partial

from ..extract.config import OUTPUT_DTYPES
from ..extract.errors import ExtractionInputError
from ..resize import ResizeOptions, open_lora_input, parse_recipes, resize_lora
from . import comfy_adapter as comfy
from .file_inputs import listed_file
from .resize_node import DEVICES, MERGE_FIX, NONE, SAVE_TO, _base_model

log = logging.getLogger(__name__)

DEFAULT_MERGE_RECIPE = "rank=32"


class LoraMerge:
    """Sum weighted LoRAs (LoKr, LoHa, DoRA, full differences too) and cut the sum to a rank or size."""

    DESCRIPTION = ("Merges several LoRAs into one: the weighted sum of their changes, layer by layer "
                   "(any key style, LoKr/LoHa/DoRA/full-difference files converted), cut by score "
                   "recipes to a rank, a size or a threshold. One file per recipe.")
    CATEGORY = "LoRA extraction"
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("lora_paths", "report")
    OUTPUT_TOOLTIPS = ("Full paths of the saved LoRA files, one per line (one per recipe).",
                       "What was merged and kept per recipe: ranks, errors, converted layers.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "loras": ("STRING", {
                    "default": "", "multiline": True,
                    "tooltip": "The LoRAs to merge, one 'name:weight' per line or comma (names as the "
                               "loras folder lists them; weight default 1, may be negative)."}),
                "score_recipes": ("STRING", {
                    "default": DEFAULT_MERGE_RECIPE,
                    "tooltip": "How to cut the sum, recipes separated by ':'. rank=N (fixed rank), "
                               "size=MiB or thr=X with methods as in LoRA Resize. E.g. "
                               "rank=32:fro_ckpt=1,size=64"}),
                "output_dtype": (list(OUTPUT_DTYPES), {"default": "fp16",
                                                       "tooltip": "Data type of the saved LoRA."}),
                "device": (list(DEVICES), {"default": "default",
                                           "tooltip": "default: ComfyUI's compute device. cpu: keep the GPU free."}),
                "verbose": ("BOOLEAN", {"default": False, "tooltip": "Per-layer ranks and errors in the report."}),
            },
            "optional": {
                "block_weights": ("STRING", {
                    "default": "", "multiline": True,
                    "tooltip": "Per-block weights, '[N:]PATTERN=WEIGHT' per line or ';': glob (or "
                               "re:REGEX) over layer names; N limits it to the N-th LoRA. E.g. "
                               "'input_blocks.*=0.5' or '2:*.attn2.*=0'."}),
                "model": ("MODEL", {"tooltip": "Base model, if no checkpoint file is chosen (UNet layers only)."}),
                "ckpt_name": ([NONE, *comfy.model_file_names("checkpoints")], {
                    "default": NONE, "tooltip": "Base checkpoint file (text encoders included); norms are cached next to it."}),
                "unet_name": ([NONE, *comfy.model_file_names("diffusion_models")], {
                    "default": NONE, "tooltip": "Or a base diffusion model file."}),
                "name": ("STRING", {"default": "", "tooltip": "Output file name stem (default: members and weights)."}),
                "save_to": (list(SAVE_TO), {"default": "output",
                                            "tooltip": "output: ComfyUI's output folder. models/loras: "
                                                       "LoraLoader lists the file at once."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def merge(self, loras: str, score_recipes: str, output_dtype: str, device: str, verbose: bool,
              block_weights: str = "", model=None, ckpt_name: str = NONE, unet_name: str = NONE,
              name: str = "", save_to: str = "output", unique_id: str | None = None) -> dict:
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
        base = _base_model(model, ckpt_name, unet_name)
        folder = (comfy.loras_directory() if save_to == "models/loras"
                  else os.path.join(comfy.output_directory(), "loras"))
        bar = comfy.progress_bar(max(1, len(lora.prefixes) + len(recipes)))

        def progress(done: int, total: int, key: str) -> None:
            bar(done, total, key)
            comfy.send_progress_text(f"{done}/{total}: {key}", unique_id)

        try:
            report = resize_lora(base, lora, recipes, folder, opts, progress=progress,
                                 check_interrupt=comfy.check_interrupt)
        finally:
            if dev != "cpu":
                comfy.soft_empty_cache()
        text = report.format_text(per_layer=verbose)
        log.info("LoRA merge finished:\n%s", text)
        return {"ui": {"text": [text]}, "result": ("\n".join(report.output_paths), text)}
