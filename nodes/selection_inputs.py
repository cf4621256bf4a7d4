"""Optional inputs of both extraction nodes for which layers go in (appended after ``dora``, so
workflows saved before them keep their widget values)."""

from __future__ import annotations

from ..extract.new_tensors import NEW_TENSOR_MODES
from ..extract.selection import LAYER_PRESETS

SELECTION_INPUTS: dict[str, tuple] = {
    "layer_preset": (list(LAYER_PRESETS), {
        "default": "all",
        "tooltip": "Which layers go in. attention: attention projections. attention_mlp: "
                   "attention and feed-forward layers. no_embed_head_norm: everything but "
                   "embeddings, output heads and norms. Works for UNets, DiTs and text encoders; "
                   "left-out layers are listed in the report with the reason."}),
    "include": ("STRING", {
        "default": "", "multiline": False,
        "tooltip": "Only parameters matching one of these patterns, separated by ';': a glob "
                   "over the whole parameter path or file key (e.g. 'double_blocks.*'), or "
                   "re:REGEX searched in it. Empty: no limit."}),
    "exclude": ("STRING", {
        "default": "", "multiline": False,
        "tooltip": "Leave out parameters matching one of these patterns (same syntax as "
                   "include), e.g. '*.norm*; re:^final_layer'."}),
    "min_change_rel": ("FLOAT", {
        "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001,
        "tooltip": "Leave out layers whose change ||dW||/||W|| is below this (0 = off). With "
                   "quantized models the absolute threshold then defaults to their noise floor."}),
    "min_change_abs": ("FLOAT", {
        "default": 0.0, "min": 0.0, "max": 1e6, "step": 0.001,
        "tooltip": "Leave out layers whose change ||dW|| (Frobenius norm) is below this (0 = off)."}),
    "new_tensors": (list(NEW_TENSOR_MODES), {
        "default": "set_weight",
        "tooltip": "Parameters only the fine-tuned model has. set_weight: stored so ComfyUI's "
                   "loader replaces the weight (whatever the strength) where the model has that "
                   "parameter. skip: left out. Both are listed in the report."}),
}
