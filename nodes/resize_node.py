"""The LoraResize node: compress a LoRA (or a weighted merge) against its base model."""

from __future__ import annotations

import logging
import os
from functools import partial

from ..extract.errors import ExtractionInputError
from ..extract.options import EXTRACT
from ..resize import (
    DEFAULT_RECIPES,
    BaseModel,
    LoraInput,
    ResizeOptions,
    open_lora_input,
    parse_recipes,
    resize_lora,
)
from . import comfy_adapter as comfy
from .comfy_io import io, option_input, unique_id
from .extract_node import CATEGORY
from .file_inputs import listed_file

log = logging.getLogger(__name__)

NONE = "none"
DEVICES = ("default", "cpu")


MERGE_FIX = "write the names as lora_name lists them, e.g. 'style.safetensors:0.7,char.safetensors:0.3'."


def _lora_input(lora_name: str, merge: str) -> LoraInput:
    """``lora_name``, or the ``merge`` spec when one is given, with names from the loras folder.

    ``.safetensors`` may be left out of either: merge specs are typed by hand.
    """
    if merge.strip():
        resolve = partial(listed_file, "merge member", fix=MERGE_FIX, optional_suffix=".safetensors")
        return open_lora_input(merge, resolve=resolve)
    return open_lora_input(lora_name, resolve=partial(listed_file, "lora_name", optional_suffix=".safetensors"))


def open_base_model(model, ckpt_name: str, unet_name: str) -> BaseModel:
    files = [(i, f, n) for i, f, n in (("ckpt_name", "checkpoints", ckpt_name),
                                       ("unet_name", "diffusion_models", unet_name)) if n and n != NONE]
    if len(files) > 1:
        raise ExtractionInputError(
            f"both ckpt_name {ckpt_name!r} and unet_name {unet_name!r} are set; choose one base model.")
    if files:
        input_name, folder, name = files[0]
        return BaseModel.open(listed_file(input_name, name, folder), comfy.cache_directory())
    if model is not None:
        # Weights as patched, read one at a time; norms are cached for this run only.
        return BaseModel(comfy.ComfyModelSource(model, "model"))
    raise ExtractionInputError(
        "no base model: connect a MODEL or pick a ckpt_name / unet_name (the model the LoRA was "
        "trained on).")


def base_model_inputs() -> list[io.Input]:
    """The base model of a resize or merge: a MODEL, or a checkpoint / diffusion model file."""
    return [
        io.Model.Input("model", optional=True,
                       tooltip="Base model, if no checkpoint file is chosen (UNet layers only)."),
        io.Combo.Input("ckpt_name", options=[NONE, *comfy.model_file_names("checkpoints")],
                       default=NONE, optional=True,
                       tooltip="Base checkpoint file (text encoders included); its norms are "
                               "cached in ComfyUI's user folder."),
        io.Combo.Input("unet_name", options=[NONE, *comfy.model_file_names("diffusion_models")],
                       default=NONE, optional=True, tooltip="Or a base diffusion model file."),
    ]


def output_inputs() -> list[io.Input]:
    """output_dtype, device and verbose: how a resize or merge writes and reports."""
    return [
        option_input(EXTRACT["output_dtype"]),
        io.Combo.Input("device", options=list(DEVICES), default="default",
                       tooltip="default: ComfyUI's compute device. cpu: keep the GPU free."),
        io.Boolean.Input("verbose", default=False,
                         tooltip="Per-layer ranks and errors in the report."),
    ]


def resize_outputs(report_tooltip: str) -> list[io.Output]:
    return [io.String.Output("lora_paths", display_name="lora_paths",
                             tooltip="Full paths of the saved LoRA files, one per line (one per "
                                     "recipe)."),
            io.String.Output("report", display_name="report", tooltip=report_tooltip)]


class LoraResize(io.ComfyNode):
    """Resize a LoRA by scoring its SVD dimensions against the base model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraResize",
            display_name="LoRA Resize (base-model aware)",
            category=CATEGORY,
            description=("Compresses a LoRA: exact SVD of every layer, dimensions scored against "
                         "the base model's layers (or the LoRA itself) by score recipes, kept by "
                         "threshold or target size. One file per recipe."),
            inputs=[
                io.Combo.Input("lora_name", options=comfy.lora_file_names(),
                               tooltip="The LoRA to resize (ignored when merge is set)."),
                io.String.Input(
                    "score_recipes", default=DEFAULT_RECIPES,
                    tooltip="Recipes separated by ':'. Methods spn_ckpt, fro_ckpt, spn_lora, "
                            "fro_lora, subspace, params (weights normalised to 1), then thr=X "
                            "(keep score >= X) or size=MiB, optional rescale=Z. E.g. "
                            "fro_ckpt=1,thr=-3.5:spn_ckpt=1,size=32"),
                *output_inputs(),
                *base_model_inputs(),
                io.String.Input("merge", default="", optional=True,
                                tooltip="Weighted merge resized instead of lora_name, e.g. "
                                        "'style.safetensors:0.7,char.safetensors:0.3'."),
                option_input(EXTRACT["save_to"]),
            ],
            outputs=resize_outputs("What was kept per recipe: thresholds, ranks, errors, "
                                   "skipped layers."),
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora_name: str, score_recipes: str, output_dtype: str, device: str,
                verbose: bool, model=None, ckpt_name: str = NONE, unet_name: str = NONE,
                merge: str = "", save_to: str = "output") -> io.NodeOutput:
        recipes = parse_recipes(score_recipes)
        dev = str(comfy.compute_device()) if device == "default" else "cpu"
        opts = ResizeOptions(output_dtype=output_dtype, device=dev, rename_existing=True).validate()
        lora = _lora_input(lora_name, merge)
        base = open_base_model(model, ckpt_name, unet_name)
        folder = (comfy.loras_directory() if save_to == "models/loras"
                  else os.path.join(comfy.output_directory(), "loras"))
        report = run_resize(base, lora, recipes, folder, opts, unique_id(cls))
        text = report.format_text(per_layer=verbose)
        log.info("LoRA resize finished:\n%s", text)
        return io.NodeOutput("\n".join(report.output_paths), text, ui={"text": [text]})


def run_resize(base: BaseModel, lora: LoraInput, recipes: list, folder: str,
               opts: ResizeOptions, node_id: str | None):
    """``resize_lora`` with the node's progress bar, live text, Cancel and cache release."""
    bar = comfy.progress_bar(max(1, len(lora.prefixes) + len(recipes)))

    def progress(done: int, total: int, key: str) -> None:
        bar(done, total, key)
        comfy.send_progress_text(f"{done}/{total}: {key}", node_id)

    try:
        return resize_lora(base, lora, recipes, folder, opts, progress=progress,
                           check_interrupt=comfy.check_interrupt)
    finally:
        if opts.device != "cpu":
            comfy.soft_empty_cache()
