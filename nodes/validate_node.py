"""The LoraValidate node: does Base + LoRA reproduce the fine-tuned model, layer by layer?"""

from __future__ import annotations

import logging
import math
import os

import torch

from ..charts import validation_chart
from ..extract.errors import ExtractionInputError
from ..extract.formats.dispatch import open_source
from ..validation.validate import LOADER_COMPLETE, LOADERS, validate_lora
from . import comfy_adapter as comfy
from .chart_output import chart_outputs
from .comfy_io import io, unique_id
from .extract_node import CATEGORY
from .file_inputs import listed_file
from .summary_lines import validation_key_lines, with_key_lines

log = logging.getLogger(__name__)

# The lora_name choice that means "use the lora_path input" (always valid, so a workflow that
# chains LoraExtract -> LoraValidate passes ComfyUI's input check even with no LoRA files yet).
FROM_PATH = "(from lora_path)"


def _inside(path: str, root: str) -> bool:
    root = os.path.realpath(root)
    return os.path.commonpath([root, path]) == root


def resolve_lora_file(lora_name: str, lora_path: str) -> str:
    """The LoRA file to check: ``lora_path`` if given, else ``lora_name`` from the loras folder.

    ``lora_path`` must lie in ComfyUI's output, temp or loras folders (where LoraExtract saves),
    so a shared server cannot be asked to read arbitrary files.
    """
    if lora_path and lora_path.strip():
        full = os.path.realpath(lora_path.strip())
        roots = [comfy.output_directory(), comfy.temp_directory(), *comfy.loras_directories()]
        if not any(_inside(full, r) for r in roots):
            raise ExtractionInputError(
                f"lora_path {lora_path!r} is outside ComfyUI's output, temp and loras folders; "
                "connect LoraExtract's lora_path output, or pick the file in lora_name.")
        if not os.path.isfile(full):
            raise ExtractionInputError(f"lora_path {lora_path!r}: no such file.")
        return full
    if lora_name == FROM_PATH:
        raise ExtractionInputError(
            "no LoRA given: pick a file in lora_name, or connect LoraExtract's lora_path output "
            "to lora_path.")
    return listed_file("lora_name", lora_name, fix="refresh the node (R) and pick an existing file.")


class LoraValidate(io.ComfyNode):
    """Apply a LoRA to the original model and compare every weight with the fine-tuned one."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraValidate",
            display_name="LoRA Validate (original + LoRA = fine-tuned?)",
            category=CATEGORY,
            description=("Checks that original + LoRA = fine-tuned, per layer: relative error, "
                         "which changed weights the LoRA covers, LoRA keys that match nothing, "
                         "and a chart."),
            inputs=[
                io.Model.Input("finetuned_model",
                               tooltip="The fine-tuned model the LoRA should reproduce."),
                io.Model.Input("original_model",
                               tooltip="The base model the LoRA is applied to."),
                io.Combo.Input("lora_name", options=[FROM_PATH, *comfy.lora_file_names()],
                               default=FROM_PATH,
                               tooltip="A LoRA from the loras folder, or '(from lora_path)' to "
                                       "check the file connected to lora_path."),
                io.String.Input("lora_path", force_input=True, optional=True,
                                tooltip="Path of a LoRA file, e.g. LoraExtract's lora_path "
                                        "output; takes precedence over lora_name."),
                io.Combo.Input("loader", options=list(LOADERS), default=LOADER_COMPLETE,
                               optional=True,
                               tooltip="Score the LoRA as 'Load LoRA' applies it (comfyui: diffs "
                                       "on parameters of modules with sub-modules, e.g. WAN "
                                       "modulation, are not applied) or as 'Load LoRA "
                                       "(complete)' does (complete)."),
            ],
            outputs=[
                io.String.Output("report", display_name="report",
                                 tooltip="Validation summary: coverage, errors, quality bands, "
                                         "worst layers."),
                io.Image.Output("chart", display_name="chart",
                                tooltip="Chart: rank and relative error per layer by block, and "
                                        "the spectra of the largest differences with the LoRA's "
                                        "rank marked."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, finetuned_model, original_model, lora_name: str, lora_path: str = "",
                loader: str = LOADER_COMPLETE) -> io.NodeOutput:
        node_id = unique_id(cls)
        path = resolve_lora_file(lora_name, lora_path or "")
        tuned = comfy.ComfyModelSource(finetuned_model, "finetuned_model")
        base = comfy.ComfyModelSource(original_model, "original_model")
        lora = open_source(path)
        bar = comfy.progress_bar(max(1, len(tuned.keys())))
        device = torch.device(comfy.compute_device())
        if device.type != "cpu":
            # base, tuned, difference and patched weight of the largest layer, in float32.
            largest = max((math.prod(tuned.shape(k)) for k in tuned.keys()), default=0)
            comfy.free_memory(largest * 4 * 5, device)

        def progress(done: int, total: int, key: str) -> None:
            bar(done, total, key)
            comfy.send_progress_text(f"validating layer {done}/{total}: {key}", node_id)

        try:
            report = validate_lora(base, tuned, lora, device=device, progress=progress,
                                   check_interrupt=comfy.check_interrupt, loader=loader)
        finally:
            comfy.soft_empty_cache()
        report.lora_name = os.path.basename(path)
        text = report.format_text()
        log.info("LoRA validation finished:\n%s", text)
        chart, preview = chart_outputs(validation_chart(report), "lora_validate_chart")
        summary = with_key_lines(validation_key_lines(report, path), text)
        return io.NodeOutput(text, chart, ui={"text": [summary], "images": preview})
