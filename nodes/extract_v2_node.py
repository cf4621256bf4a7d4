"""The LoraExtractV2 node: LoraExtract with the block-swap VRAM manager (memory/manager.py)."""

from __future__ import annotations

import logging

import torch

from ..memory.manager import extract_to_file_v2
from ..memory.planner import MAX_BATCH, MAX_BLOCKS, MAX_PREFETCH, MODES, MemoryOptions
from ..memory.run_report import MemoryRunReport
from . import comfy_adapter as comfy
from .extract_inputs import build_config, extraction_inputs
from .extract_node import run_node_extraction

log = logging.getLogger(__name__)


def v2_inputs() -> dict[str, dict[str, tuple]]:
    """LoraExtract's inputs (V2 file prefix) plus the memory knobs."""
    spec = extraction_inputs("loras/ComfyUI_v2_extracted_lora")
    spec["required"].update({
        "vram_usage_mode": (list(MODES), {
            "default": "balanced",
            "tooltip": "Share of free VRAM the run may use: conservative ~50% (one layer at a time, "
                       "nothing kept), balanced ~75%, aggressive ~90%, maximum ~95% (every block that "
                       "fits stays). Results are identical in every mode."}),
        "blocks_in_gpu": ("INT", {"default": 10, "min": 0, "max": MAX_BLOCKS, "step": 1,
                                  "tooltip": "Model blocks kept on the GPU for the session (middle, "
                                             "output, input, then others), so a second extraction "
                                             "from the same models does not move them again."}),
        "batch_size": ("INT", {"default": 4, "min": 1, "max": MAX_BATCH, "step": 1,
                               "tooltip": "Layers processed together; same-shaped layers share one "
                                          "batched SVD on the GPU (no gain on a CPU)."}),
        "prefetch_ahead": ("INT", {"default": 2, "min": 0, "max": MAX_PREFETCH, "step": 1,
                                   "tooltip": "Batches read and transferred in the background while "
                                              "the current one is decomposed."}),
        "memory_threshold": ("FLOAT", {"default": 0.85, "min": 0.5, "max": 0.95, "step": 0.01,
                                       "tooltip": "When used VRAM passes this share, kept blocks are "
                                                  "offloaded and batches made smaller."}),
        "debug_mode": ("BOOLEAN", {"default": False,
                                   "tooltip": "Add the memory log (budget, blocks kept, per-batch "
                                              "time and VRAM, threshold events) to the report."}),
    })
    return spec


class LoraExtractV2:
    """LoraExtract plus VRAM management: same file contents, measured speed-ups on a GPU."""

    DESCRIPTION = ("Extracts a LoRA like LoRA Extract (identical ranks and factors), streaming "
                   "layers to the GPU in batches with background read-ahead and keeping model "
                   "blocks resident between runs. Measured speed: docs/performance.md in the pack.")
    CATEGORY = "LoRA extraction"
    FUNCTION = "extract"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("lora_path", "report", "chart")
    OUTPUT_TOOLTIPS = ("Full path of the saved LoRA file.",
                       "Per-layer extraction summary (plus the memory log with debug_mode).",
                       "Chart: rank and relative error per layer by block, and the spectra of "
                       "the largest layers with the cut marked.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return v2_inputs()

    def extract(self, filename_prefix: str, rank: int, lora_type: str, algorithm: str,
                lowrank_iters: int, output_dtype: str, bias_diff: bool, adaptive_param: float,
                clamp_quantile: bool, finetuned_model=None, original_model=None,
                finetuned_clip=None, original_clip=None, text_encoder_rank: int = 0,
                vram_usage_mode: str = "balanced", blocks_in_gpu: int = 10, batch_size: int = 4,
                prefetch_ahead: int = 2, memory_threshold: float = 0.85, debug_mode: bool = False,
                conv_rank: int = 0, alpha: float = 0.0, key_style: str = "auto",
                save_to: str = "output", target_size_mb: float = 0.0,
                size_objective: str = "mean", dora: str = "off",
                layer_preset: str = "all", include: str = "", exclude: str = "",
                min_change_rel: float = 0.0, min_change_abs: float = 0.0,
                new_tensors: str = "set_weight", unique_id: str | None = None) -> dict:
        device = comfy.compute_device()
        cfg = build_config(rank=rank, lora_type=lora_type, algorithm=algorithm,
                           lowrank_iters=lowrank_iters, output_dtype=output_dtype,
                           bias_diff=bias_diff, adaptive_param=adaptive_param,
                           clamp_quantile=clamp_quantile, conv_rank=conv_rank, alpha=alpha,
                           key_style=key_style, device=str(device),
                           target_size_mb=target_size_mb, text_encoder_rank=text_encoder_rank,
                           size_objective=size_objective, dora=dora,
                           layer_preset=layer_preset, include=include, exclude=exclude,
                           min_change_rel=min_change_rel, min_change_abs=min_change_abs,
                           new_tensors=new_tensors)
        # The widgets always carry a value, so they are explicit knobs (the mode still sets
        # the budget; conservative stays sequential).
        opts = MemoryOptions(mode=vram_usage_mode, blocks_in_gpu=blocks_in_gpu,
                             batch_size=batch_size, prefetch_ahead=prefetch_ahead,
                             memory_threshold=memory_threshold, debug=debug_mode).validate()
        memory: list[MemoryRunReport] = []

        def extract_v2(base, tuned, cfg_, path, *, progress, check_interrupt):
            on_gpu = torch.device(device).type != "cpu"
            report, mem = extract_to_file_v2(
                base, tuned, cfg_, opts, path, progress=progress, check_interrupt=check_interrupt,
                probe=(lambda: comfy.free_and_total_memory(device)) if on_gpu else (lambda: None),
                free_memory=comfy.free_memory if on_gpu else None)
            memory.append(mem)
            return report

        suffix = (f"{cfg.name_tag()}_{output_dtype}_{vram_usage_mode}_b{blocks_in_gpu}"
                  f"_bs{batch_size}")
        res = run_node_extraction(finetuned_model, original_model, filename_prefix, suffix, cfg,
                                  save_to, unique_id, extract_fn=extract_v2,
                                  finetuned_clip=finetuned_clip, original_clip=original_clip)
        text = res.text
        if debug_mode and memory:
            debug = memory[0].format_debug()
            log.info("LoraExtractV2 memory log:\n%s", debug)
            text = f"{text}\n{debug}"
            res.text = text
        return {"ui": res.ui(), "result": (res.path, text, res.chart)}
