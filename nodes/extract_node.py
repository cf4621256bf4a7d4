"""The LoraExtract node: fine-tuned MODEL minus original MODEL, saved as a LoRA file."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..charts import extraction_chart
from ..extract.output_paths import next_free_path, resolve_prefix
from ..extract.pipeline import extract_to_file
from ..extract.report import ExtractionReport
from . import comfy_adapter as comfy
from .chart_output import chart_outputs
from .comfy_io import io, unique_id
from .extract_inputs import build_config, extraction_inputs, save_root_and_prefix
from .model_inputs import node_sources
from .summary_lines import extraction_key_lines, with_key_lines

log = logging.getLogger(__name__)

CATEGORY = "LoRA extraction"


@dataclass
class NodeExtraction:
    """What an extraction node returns: the file, its report, and the report chart."""

    path: str
    text: str
    report: ExtractionReport
    chart: torch.Tensor                     # IMAGE [1, H, W, 3]
    preview: list[dict[str, str]]           # ui "images" entries showing the chart on the node

    def ui(self) -> dict[str, list]:
        summary = with_key_lines(extraction_key_lines(self.report, self.path), self.text)
        return {"text": [summary], "images": self.preview}


def run_node_extraction(finetuned_model, original_model, filename_prefix: str, name_suffix: str,
                        cfg, save_to: str, unique_id: str | None,
                        extract_fn: Callable[..., ExtractionReport] = extract_to_file,
                        finetuned_clip=None, original_clip=None) -> NodeExtraction:
    """Shared body of the extraction nodes: resolve the file name, extract, save, report, chart.

    ``extract_fn(base, tuned, cfg, path, progress=..., check_interrupt=...)`` writes the file and
    returns its report; V1 uses ``extract_to_file``, another engine can pass its own.
    """
    # Inputs first: a wrong connection is reported before any file name is taken.
    base, tuned = node_sources(finetuned_model, original_model, finetuned_clip, original_clip)
    root, prefix = save_root_and_prefix(save_to, filename_prefix, comfy.output_directory(),
                                        comfy.loras_directory())
    folder, stem = resolve_prefix(root, prefix)
    path = next_free_path(folder, stem, lambda c: f"{stem}_{name_suffix}_{c:05}_.safetensors")
    bar = comfy.progress_bar(max(1, len(tuned.keys())))
    device = torch.device(cfg.device)
    if device.type != "cpu":
        # Room for the largest layer's float32 difference, its factors and the SVD workspace;
        # ComfyUI unloads other models to make it, instead of us loading both inputs whole.
        largest = max((math.prod(tuned.shape(k)) for k in tuned.keys()), default=0)
        comfy.free_memory(largest * 4 * 4, device)

    def progress(done: int, total: int, key: str) -> None:
        bar(done, total, key)
        comfy.send_progress_text(f"layer {done}/{total}: {key}", unique_id)

    try:
        report = extract_fn(base, tuned, cfg, path, progress=progress,
                            check_interrupt=comfy.check_interrupt)
    finally:
        # Release cached GPU blocks whatever happened (success, error or interrupt).
        comfy.soft_empty_cache()
    text = report.format_text()
    log.info("LoRA extraction finished:\n%s", text)
    chart, preview = chart_outputs(extraction_chart(report), "lora_extract_chart")
    return NodeExtraction(path, text, report, chart, preview)


OUTPUT_TOOLTIPS = ("Full path of the saved LoRA file.", "Per-layer extraction summary.",
                   "Chart: rank and relative error per layer by block, and the spectra of the "
                   "largest layers with the cut marked.")


def extraction_outputs(report_tooltip: str) -> list[io.Output]:
    """lora_path, report and chart: the outputs of both extraction nodes."""
    return [io.String.Output("lora_path", display_name="lora_path", tooltip=OUTPUT_TOOLTIPS[0]),
            io.String.Output("report", display_name="report", tooltip=report_tooltip),
            io.Image.Output("chart", display_name="chart", tooltip=OUTPUT_TOOLTIPS[2])]


class LoraExtract(io.ComfyNode):
    """Extract a LoRA from the difference of two models and save it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraExtract",
            display_name="LoRA Extract (fine-tuned - original)",
            category=CATEGORY,
            description=("Extracts the difference between a fine-tuned and an original model as "
                         "a LoRA file (SVD per layer), with a per-layer report of ranks and "
                         "errors."),
            inputs=extraction_inputs("loras/ComfyUI_extracted_lora"),
            outputs=extraction_outputs(OUTPUT_TOOLTIPS[1]),
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, filename_prefix: str, rank: int, lora_type: str, algorithm: str,
                lowrank_iters: int, output_dtype: str, bias_diff: bool, adaptive_param: float,
                clamp_quantile: bool, finetuned_model=None, original_model=None,
                finetuned_clip=None, original_clip=None, text_encoder_rank: int = 0,
                conv_rank: int = 0, alpha: float = 0.0, key_style: str = "auto",
                save_to: str = "output", target_size_mb: float = 0.0,
                size_objective: str = "mean", dora: str = "off", layer_preset: str = "all",
                include: str = "", exclude: str = "", min_change_rel: float = 0.0,
                min_change_abs: float = 0.0, new_tensors: str = "set_weight") -> io.NodeOutput:
        cfg = build_config(str(comfy.compute_device()), rank=rank, lora_type=lora_type,
                           algorithm=algorithm, lowrank_iters=lowrank_iters,
                           output_dtype=output_dtype, bias_diff=bias_diff,
                           adaptive_param=adaptive_param, clamp_quantile=clamp_quantile,
                           conv_rank=conv_rank, alpha=alpha, key_style=key_style,
                           target_size_mb=target_size_mb, text_encoder_rank=text_encoder_rank,
                           size_objective=size_objective, dora=dora, layer_preset=layer_preset,
                           include=include, exclude=exclude, min_change_rel=min_change_rel,
                           min_change_abs=min_change_abs, new_tensors=new_tensors)
        res = run_node_extraction(
            finetuned_model, original_model, filename_prefix,
            f"{cfg.name_tag()}_{output_dtype}", cfg, save_to, unique_id(cls),
            finetuned_clip=finetuned_clip, original_clip=original_clip)
        return io.NodeOutput(res.path, res.text, res.chart, ui=res.ui())
