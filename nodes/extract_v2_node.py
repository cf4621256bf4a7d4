"""The LoraExtractV2 node: LoraExtract run by the streamed block-swap engine
(``memory/streamed_extract.py``)."""

from __future__ import annotations

import logging

import torch

from ..memory.options import MEMORY_OPTIONS
from ..memory.planner import MemoryOptions
from ..memory.run_report import MemoryRunReport
from ..memory.streamed_extract import extract_to_file_streamed
from . import comfy_adapter as comfy
from .comfy_io import io, unique_id
from .extract_inputs import build_config, extraction_inputs
from .extract_node import CATEGORY, extraction_outputs, run_node_extraction

log = logging.getLogger(__name__)


class LoraExtractV2(io.ComfyNode):
    """LoraExtract plus VRAM management: same file contents, measured speed-ups on a GPU."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoraExtractV2",
            display_name="LoRA Extract V2 (block-swap VRAM manager)",
            category=CATEGORY,
            description=("Extracts a LoRA like LoRA Extract (identical ranks and factors), "
                         "streaming layers to the GPU in batches with background read-ahead and "
                         "keeping model blocks resident between runs. Measured speed: "
                         "docs/performance.md in the pack."),
            # LoraExtract's inputs (V2 file prefix), the memory knobs after its required ones.
            inputs=extraction_inputs("loras/ComfyUI_v2_extracted_lora", MEMORY_OPTIONS),
            outputs=extraction_outputs(
                "Per-layer extraction summary (plus the memory log with debug_mode)."),
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, filename_prefix: str, rank: int, lora_type: str, algorithm: str,
                lowrank_iters: int, output_dtype: str, bias_diff: bool, adaptive_param: float,
                clamp_quantile: bool, finetuned_model=None, original_model=None,
                finetuned_clip=None, original_clip=None, text_encoder_rank: int = 0,
                vram_usage_mode: str = "balanced", blocks_in_gpu: int = 10, batch_size: int = 4,
                prefetch_ahead: int = 2, memory_threshold: float = 0.85, debug_mode: bool = False,
                conv_rank: int = 0, alpha: float = 0.0, key_style: str = "auto",
                save_to: str = "output", target_size_mb: float = 0.0,
                size_objective: str = "mean", dora: str = "off", layer_preset: str = "all",
                include: str = "", exclude: str = "", min_change_rel: float = 0.0,
                min_change_abs: float = 0.0, new_tensors: str = "set_weight") -> io.NodeOutput:
        device = comfy.compute_device()
        cfg = build_config(str(device), rank=rank, lora_type=lora_type, algorithm=algorithm,
                           lowrank_iters=lowrank_iters, output_dtype=output_dtype,
                           bias_diff=bias_diff, adaptive_param=adaptive_param,
                           clamp_quantile=clamp_quantile, conv_rank=conv_rank, alpha=alpha,
                           key_style=key_style, target_size_mb=target_size_mb,
                           text_encoder_rank=text_encoder_rank, size_objective=size_objective,
                           dora=dora, layer_preset=layer_preset, include=include, exclude=exclude,
                           min_change_rel=min_change_rel, min_change_abs=min_change_abs,
                           new_tensors=new_tensors)
        # The widgets always carry a value, so they are explicit knobs (the mode still sets
        # the budget; conservative stays sequential).
        opts = MemoryOptions(mode=vram_usage_mode, blocks_in_gpu=blocks_in_gpu,
                             batch_size=batch_size, prefetch_ahead=prefetch_ahead,
                             memory_threshold=memory_threshold, debug=debug_mode).validate()
        memory: list[MemoryRunReport] = []

        def extract_streamed(base, tuned, cfg_, path, *, progress, check_interrupt):
            on_gpu = torch.device(device).type != "cpu"
            report, mem = extract_to_file_streamed(
                base, tuned, cfg_, opts, path, progress=progress, check_interrupt=check_interrupt,
                probe=(lambda: comfy.free_and_total_memory(device)) if on_gpu else (lambda: None),
                free_memory=comfy.free_memory if on_gpu else None)
            memory.append(mem)
            return report

        suffix = (f"{cfg.name_tag()}_{output_dtype}_{vram_usage_mode}_b{blocks_in_gpu}"
                  f"_bs{batch_size}")
        res = run_node_extraction(finetuned_model, original_model, filename_prefix, suffix, cfg,
                                  save_to, unique_id(cls), extract_fn=extract_streamed,
                                  finetuned_clip=finetuned_clip, original_clip=original_clip)
        text = res.text
        if debug_mode and memory:
            debug = memory[0].format_debug()
            log.info("LoraExtractV2 memory log:\n%s", debug)
            text = f"{text}\n{debug}"
            res.text = text
        return io.NodeOutput(res.path, text, res.chart, ui=res.ui())
