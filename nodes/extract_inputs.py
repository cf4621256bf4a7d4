"""Input definitions and config building shared by the extraction nodes (V1 and V2)."""

from __future__ import annotations

from ..extract.budget import MAX_TARGET_MB, SIZE_OBJECTIVES
from ..extract.config import ALGORITHMS, DORA_OPTIONS, LORA_TYPES, OUTPUT_DTYPES, ExtractConfig
from ..extract.keys import KEY_STYLES
from .model_inputs import MODEL_AND_CLIP_INPUTS
from .selection_inputs import SELECTION_INPUTS

SAVE_TO = ("output", "models/loras")


def extraction_inputs(default_prefix: str) -> dict[str, dict[str, tuple]]:
    """The LoraExtract inputs, defaults and ranges as the KJ node documents them, plus extras."""
    return {
        "required": {
            "filename_prefix": ("STRING", {
                "default": default_prefix,
                "tooltip": "File name prefix, relative to the output folder (sub-folders allowed, "
                           "no '..' or absolute paths)."}),
            "rank": ("INT", {"default": 8, "min": 1, "max": 4096, "step": 1,
                             "tooltip": "LoRA rank for 'standard'; the rank cap for adaptive types."}),
            "lora_type": (list(LORA_TYPES), {
                "default": "standard",
                "tooltip": "standard: fixed rank. full: store the whole difference. adaptive_*: "
                           "rank per layer from the spectrum and adaptive_param (capped by rank)."}),
            "algorithm": (list(ALGORITHMS), {
                "default": "svd_linalg",
                "tooltip": "svd_linalg: exact SVD. svd_lowrank: randomized SVD, much faster, "
                           "error within a fraction of a percent of optimal; works with every lora_type."}),
            "lowrank_iters": ("INT", {"default": 7, "min": 1, "max": 100, "step": 1,
                                      "tooltip": "Power iterations of svd_lowrank: more is slower and more accurate."}),
            "output_dtype": (list(OUTPUT_DTYPES), {"default": "fp16", "tooltip": "Data type of the saved LoRA."}),
            "bias_diff": ("BOOLEAN", {"default": True, "tooltip": "Also store bias and other non-matrix "
                                                                  "differences (norms, pos_embed, modulation)."}),
            "adaptive_param": ("FLOAT", {
                "default": 0.15, "min": 0.0, "max": 1.0, "step": 0.01,
                "tooltip": "adaptive_ratio: keep sigma > p*sigma_max. adaptive_quantile: share of the "
                           "sum of sigma. adaptive_energy: share of sum sigma^2. adaptive_fro: share of ||dW||."}),
            "clamp_quantile": ("BOOLEAN", {"default": True, "tooltip": "Clip outliers only: in each rank "
                "component, entries of up and of down beyond 2x the 0.99 quantile of that vector's "
                "own absolute values. No extreme values, almost no added error."}),
        },
        "optional": {
            # MODEL and CLIP pairs: either pair alone is enough (checked in model_inputs.py).
            **MODEL_AND_CLIP_INPUTS,
            "text_encoder_rank": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 1,
                                          "tooltip": "Rank (cap) for text-encoder layers; 0 = same as rank."}),
            "conv_rank": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 1,
                                  "tooltip": "Rank (cap) for conv layers; 0 = same as rank."}),
            "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.5,
                                "tooltip": "LoRA alpha; 0 = equal to the rank (scale 1). The factors are "
                                           "rescaled so strength 1 reproduces the difference."}),
            "key_style": (list(KEY_STYLES), {"default": "auto",
                                             "tooltip": "auto: diffusers for a diffusers-named model, else comfy. "
                                                        "comfy: diffusion_model.* and text_encoders.* keys. "
                                                        "kohya: lora_unet_* and lora_te_* (SDXL: lora_te1_/"
                                                        "lora_te2_) keys and ss_* metadata. diffusers: PEFT keys "
                                                        "(transformer.* / unet.* / text_encoder.*, lora_A/lora_B) "
                                                        "for diffusers-named models."}),
            "save_to": (list(SAVE_TO), {"default": "output",
                                        "tooltip": "output: ComfyUI's output folder. models/loras: LoraLoader "
                                                   "lists the file at once."}),
            "target_size_mb": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": float(MAX_TARGET_MB), "step": 1.0,
                "tooltip": "0 = off. Otherwise the file's tensors fit this many MiB: ranks are "
                           "allocated across layers (rank / conv_rank are the caps) for the least "
                           "total error; lora_type must be standard. The report shows the error "
                           "against size to pick a value."}),
            # Appended in order, so workflows saved before an input keep their widget values.
            "size_objective": (list(SIZE_OBJECTIVES), {
                "default": "mean",
                "tooltip": "With target_size_mb only. mean: the least average layer error. "
                           "worst: the least worst-layer error; every layer brought to one error "
                           "level, so none is left at rank 1 while others get many."}),
            "dora": (list(DORA_OPTIONS), {
                "default": "off",
                "tooltip": "off: plain LoRA. output / input: DoRA, a LoRA plus a float32 magnitude "
                           "per output or input channel (dora_scale) that ComfyUI's loader uses to "
                           "rebuild the fine-tuned weight; it captures per-channel rescaling that "
                           "plain LoRA cannot. The report compares each layer with plain LoRA in "
                           "the same bytes. Not with target_size_mb or full."}),
            **SELECTION_INPUTS,
        },
        "hidden": {"unique_id": "UNIQUE_ID"},
    }


def build_config(*, rank: int, lora_type: str, algorithm: str, lowrank_iters: int,
                 output_dtype: str, bias_diff: bool, adaptive_param: float,
                 clamp_quantile: bool, conv_rank: int, alpha: float, key_style: str,
                 device: str, target_size_mb: float, text_encoder_rank: int,
                 size_objective: str, dora: str = "off", layer_preset: str = "all",
                 include: str = "", exclude: str = "", min_change_rel: float = 0.0,
                 min_change_abs: float = 0.0, new_tensors: str = "set_weight") -> ExtractConfig:
    return ExtractConfig(
        rank=rank, lora_type=lora_type, algorithm=algorithm, lowrank_iters=lowrank_iters,
        output_dtype=output_dtype, bias_diff=bias_diff, adaptive_param=adaptive_param,
        clamp_quantile=0.99 if clamp_quantile else None, conv_rank=conv_rank, alpha=alpha,
        key_style=key_style, device=device, target_size_mb=target_size_mb,
        text_encoder_rank=text_encoder_rank, size_objective=size_objective, dora=dora,
        layer_preset=layer_preset, include=include, exclude=exclude, min_change_rel=min_change_rel,
        min_change_abs=min_change_abs, new_tensors=new_tensors).validate()


def save_root_and_prefix(save_to: str, filename_prefix: str, output_dir: str, loras_dir: str) -> tuple[str, str]:
    """The folder files go under, and the prefix relative to it.

    With ``models/loras`` a leading ``loras/`` (the default prefix) is dropped, so the file
    lands directly where LoraLoader looks instead of in ``loras/loras/``.
    """
    if save_to == "models/loras":
        p = filename_prefix.replace("\\", "/")
        return loras_dir, p[len("loras/"):] if p.startswith("loras/") else p
    return output_dir, filename_prefix
