"""Every option of an extraction, declared once, in the extraction nodes' widget order.

The LoraExtract / LoraExtractV2 inputs (``nodes/extract_inputs.py``), the ``lora-extract
extract`` flags (``cli/option_flags.py``), ``ExtractConfig.validate`` and the docs tests all read
this table. Adding an option is one entry here, appended last: saved workflows map widget
values by position, so a new input must come after the existing ones (then a field of
``ExtractConfig`` if the engine reads it).
"""

from __future__ import annotations

import torch

from .budget.rank_math import MAX_TARGET_MB, SIZE_OBJECTIVES
from .keys.lora_keys import KEY_STYLES
from .option_spec import Option, by_name
from .rank_rules import RANK_RULES
from .selection import LAYER_PRESETS
from .sources import SAFETENSORS_DTYPES

MAX_RANK = 4096
MAX_LOWRANK_ITERS = 100
MAX_ALPHA = 4096.0
ALGORITHMS = ("svd_linalg", "svd_lowrank")
# The saved factors' data types, by the name the user picks.
OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "fp16": SAFETENSORS_DTYPES["F16"], "bf16": SAFETENSORS_DTYPES["BF16"],
    "fp32": SAFETENSORS_DTYPES["F32"],
}
SAVE_TO = ("output", "models/loras")
# DoRA output (extract/dora.py): off, or the axis of the stored magnitude as ComfyUI reads it.
DORA_OPTIONS = ("off", "output", "input")
# Parameters only the fine-tuned model has (extract/new_tensors.py).
NEW_TENSOR_MODES = ("set_weight", "skip")
MAX_MIN_CHANGE_ABS = 1e6
DEFAULT_CLAMP_QUANTILE = 0.99


def lora_types() -> tuple[str, ...]:
    """``standard``, ``full`` (the whole difference), then every other registered rank rule."""
    return ("standard", "full", *(r for r in RANK_RULES if r != "standard"))


LORA_TYPES = lora_types()

EXTRACT_OPTIONS: tuple[Option, ...] = (
    Option("filename_prefix", "string", "loras/ComfyUI_extracted_lora", field=None,
           tooltip="File name prefix, relative to the output folder (sub-folders allowed, no "
                   "'..' or absolute paths)."),
    Option("rank", "int", 8, min=1, max=MAX_RANK, step=1, flag="--rank", metavar="N",
           tooltip="LoRA rank for 'standard'; the rank cap for adaptive types.",
           doc="rank of every LoRA layer; the cap with an adaptive --lora-type or --target-size"),
    Option("lora_type", "choice", "standard", choices=lora_types, flag="--lora-type",
           tooltip="standard: fixed rank. full: store the whole difference. adaptive_*: rank per "
                   "layer from the spectrum and adaptive_param (capped by rank).",
           doc="standard: fixed rank; adaptive_*: rank per layer from its spectrum "
               "(--adaptive-param); full: store whole differences"),
    Option("algorithm", "choice", "svd_linalg", choices=ALGORITHMS, flag="--algorithm",
           tooltip="svd_linalg: exact SVD. svd_lowrank: randomized SVD, much faster, error within "
                   "a fraction of a percent of optimal; works with every lora_type.",
           doc="svd_linalg: exact SVD; svd_lowrank: randomized, faster on large layers"),
    Option("lowrank_iters", "int", 8, min=1, max=MAX_LOWRANK_ITERS, step=1,
           flag="--lowrank-iters", metavar="N",
           tooltip="Power iterations of svd_lowrank: more is slower and more accurate.",
           doc=f"power iterations of svd_lowrank (1..{MAX_LOWRANK_ITERS})"),
    Option("output_dtype", "choice", "fp16", choices=tuple(OUTPUT_DTYPES), flag="--dtype",
           tooltip="Data type of the saved LoRA.", doc="data type of the saved factors"),
    Option("bias_diff", "bool", True, off_flag="--no-bias-diff",
           tooltip="Also store bias and other non-matrix differences (norms, pos_embed, "
                   "modulation).",
           doc="do not store bias / 1-D differences"),
    Option("adaptive_param", "float", 0.15, min=0.0, max=1.0, step=0.01,
           flag="--adaptive-param", metavar="X",
           tooltip="adaptive_ratio: keep sigma > p*sigma_max. adaptive_quantile: share of the sum "
                   "of sigma. adaptive_energy: share of sum sigma^2. adaptive_fro: share of ||dW||.",
           doc="parameter of the adaptive rank rule, 0..1"),
    # The node switches the clamp on or off; the command line also takes the quantile.
    Option("clamp_quantile", "bool", True, flag="--clamp-quantile", metavar="Q",
           cli_kind="float", cli_default=DEFAULT_CLAMP_QUANTILE, off_flag="--no-clamp",
           off_doc="do not clamp factor outliers",
           to_config=lambda on: DEFAULT_CLAMP_QUANTILE if on else None,
           tooltip="Clip outliers only: in each rank component, entries of up and of down beyond "
                   "2x the 0.99 quantile of that vector's own absolute values. No extreme values, "
                   "almost no added error.",
           doc="q of the outlier clamp: in each rank component, entries of up and down beyond 2x "
               "the q quantile of their own vector are clipped"),
    Option("text_encoder_rank", "int", 0, min=0, max=MAX_RANK, step=1, optional=True,
           flag="--text-encoder-rank", metavar="N",
           range_text=f"0 (same as rank) or 1..{MAX_RANK}",
           tooltip="Rank (cap) for text-encoder layers; 0 = same as rank.",
           doc="rank (cap) for text-encoder layers (0: same as --rank)"),
    Option("conv_rank", "int", 0, min=0, max=MAX_RANK, step=1, optional=True,
           flag="--conv-rank", metavar="N", range_text=f"0 (same as rank) or 1..{MAX_RANK}",
           tooltip="Rank (cap) for conv layers; 0 = same as rank.",
           doc="rank (cap) of conv layers (0: same as --rank)"),
    Option("alpha", "float", 0.0, min=0.0, max=MAX_ALPHA, step=0.5, optional=True,
           flag="--alpha", metavar="A",
           tooltip="LoRA alpha; 0 = equal to the rank (scale 1). The factors are rescaled so "
                   "strength 1 reproduces the difference.",
           doc="LoRA alpha stored in the file (0: equal to each layer's rank, scale 1)"),
    Option("key_style", "choice", "auto", choices=KEY_STYLES, optional=True, flag="--key-style",
           tooltip="auto: diffusers for a diffusers-named model, else comfy. comfy: "
                   "diffusion_model.* and text_encoders.* keys. kohya: lora_unet_* and lora_te_* "
                   "(SDXL: lora_te1_/lora_te2_) keys and ss_* metadata. diffusers: PEFT keys "
                   "(transformer.* / unet.* / text_encoder.*, lora_A/lora_B) for diffusers-named "
                   "models.",
           doc="key names written; auto: diffusers for a diffusers-named model, else comfy"),
    Option("save_to", "choice", "output", choices=SAVE_TO, optional=True, field=None,
           tooltip="output: ComfyUI's output folder. models/loras: LoraLoader lists the file at "
                   "once."),
    Option("target_size_mb", "float", 0.0, min=0.0, max=float(MAX_TARGET_MB), step=1.0,
           optional=True, flag="--target-size", metavar="MIB",
           tooltip="0 = off. Otherwise the file's tensors fit this many MiB: ranks are allocated "
                   "across layers (rank / conv_rank are the caps) for the least total error; "
                   "lora_type must be standard. The report shows the error against size to pick "
                   "a value.",
           doc="allocate ranks (capped by --rank/--conv-rank) for the least error whose tensors "
               "fit this many MiB (0: off, fixed ranks; the safetensors header comes on top)"),
    # After target_size_mb: workflows saved before it keep their widget values in place.
    Option("size_objective", "choice", "mean", choices=SIZE_OBJECTIVES, optional=True,
           flag="--size-objective",
           tooltip="With target_size_mb only. mean: the least average layer error. worst: the "
                   "least worst-layer error; every layer brought to one error level, so none is "
                   "left at rank 1 while others get many.",
           doc="with --target-size: mean = the least average layer error; worst = the least "
               "worst-layer error (no layer left far behind)"),
    Option("dora", "choice", "off", choices=DORA_OPTIONS, optional=True, flag="--dora",
           tooltip="off: plain LoRA. output / input: DoRA, a LoRA plus a float32 magnitude per "
                   "output or input channel (dora_scale) that ComfyUI's loader uses to rebuild the "
                   "fine-tuned weight; it captures per-channel rescaling that plain LoRA cannot. "
                   "The report compares each layer with plain LoRA in the same bytes. Not with "
                   "target_size_mb or full.",
           doc="off: plain LoRA; output / input: DoRA, a LoRA plus a float32 magnitude per output "
               "or input channel (dora_scale, read by ComfyUI's loader); the report compares each "
               "layer with plain LoRA in the same bytes"),
    # Which layers go in (extract/selection.py, extract/change_threshold.py, new_tensors.py).
    Option("layer_preset", "choice", "all", choices=LAYER_PRESETS, optional=True,
           flag="--layer-preset",
           tooltip="Which layers go in. attention: attention projections. attention_mlp: "
                   "attention and feed-forward layers. no_embed_head_norm: everything but "
                   "embeddings, output heads and norms. Works for UNets, DiTs and text encoders; "
                   "left-out layers are listed in the report with the reason.",
           doc="which layers go in: all; attention (attention projections); attention_mlp "
               "(attention and feed-forward); no_embed_head_norm (everything but embeddings, "
               "output heads and norms); see docs/layer-selection.md for the patterns"),
    Option("include", "string", "", optional=True, flag="--include", metavar="PATTERNS",
           repeatable=True,
           tooltip="Only parameters matching one of these patterns, separated by ';': a glob "
                   "over the whole parameter path or file key (e.g. 'double_blocks.*'), or "
                   "re:REGEX searched in it. Empty: no limit.",
           doc="extract only parameters matching one of these patterns: globs matched against "
               "the whole parameter path or file key (e.g. 'double_blocks.*') or re:REGEX "
               "searched in it, separated by ';' (repeatable)"),
    Option("exclude", "string", "", optional=True, flag="--exclude", metavar="PATTERNS",
           repeatable=True,
           tooltip="Leave out parameters matching one of these patterns (same syntax as "
                   "include), e.g. '*.norm*; re:^final_layer'.",
           doc="leave out parameters matching one of these patterns (same syntax; repeatable); "
               "each is reported with the pattern that left it out"),
    Option("min_change_rel", "float", 0.0, min=0.0, max=1.0, step=0.0001, optional=True,
           flag="--min-change", metavar="REL",
           tooltip="Leave out layers whose change ||dW||/||W|| is below this (0 = off). With "
                   "quantized models the absolute threshold then defaults to their noise floor.",
           doc="leave out layers whose change ||dW||/||W|| is below REL (0: off); with quantized "
               "inputs the absolute threshold defaults to their noise floor"),
    Option("min_change_abs", "float", 0.0, min=0.0, max=MAX_MIN_CHANGE_ABS, step=0.001,
           optional=True, flag="--min-change-abs", metavar="NORM",
           tooltip="Leave out layers whose change ||dW|| (Frobenius norm) is below this (0 = off).",
           doc="leave out layers whose change ||dW|| (Frobenius norm) is below NORM (0: off)"),
    Option("new_tensors", "choice", "set_weight", choices=NEW_TENSOR_MODES, optional=True,
           flag="--new-tensors",
           tooltip="Parameters only the fine-tuned model has. set_weight: stored so ComfyUI's "
                   "loader replaces the weight (whatever the strength) where the model has that "
                   "parameter. skip: left out. Both are listed in the report.",
           doc="parameters only the fine-tuned model has: set_weight stores them as ComfyUI "
               "'set' patches (the weight is replaced whatever the strength); skip leaves them "
               "out (both reported)"),
    # Command line only: the nodes show the noise floor and leave the choice to min_change_*.
    Option("skip_noise_layers", "bool", False, optional=True, node=False, flag="--skip-noise-layers",
           tooltip="Leave out layers whose difference is at the estimated rounding-noise level "
                   "of quantized inputs.",
           doc="quantized inputs: leave out layers whose difference is at the estimated "
               "rounding-noise level (docs/model-formats.md)"),
)

EXTRACT = by_name(EXTRACT_OPTIONS)
