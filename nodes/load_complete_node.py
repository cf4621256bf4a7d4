"""The LoraLoadComplete node: LoraLoader, plus the parameters ComfyUI's load leaves unpatched."""

from __future__ import annotations

import logging

from . import comfy_adapter as comfy
from .file_inputs import listed_file

log = logging.getLogger(__name__)


class LoraLoadComplete:
    """Apply a LoRA to MODEL (and CLIP) exactly as LoraLoader does, and apply every key.

    ComfyUI accepts ``.diff`` patches on parameters that sit directly on a module with
    sub-modules (WAN ``blocks.N.modulation``, SD3 ``pos_embed``) but never applies them when it
    loads the model. This node registers a load callback on the patched model that applies them
    through the ModelPatcher, so unloading or changing the strength restores them like any
    other patched weight.
    """

    DESCRIPTION = ("Loads a LoRA like 'Load LoRA' (same keys, same strengths) and also applies "
                   "the diffs ComfyUI's loader skips: parameters of modules with sub-modules, such "
                   "as WAN's blocks.N.modulation and SD3's pos_embed.")
    CATEGORY = "LoRA extraction"
    FUNCTION = "load_lora"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.",
                       "The CLIP with the LoRA applied (empty when no CLIP is connected).")

    def __init__(self) -> None:
        self.loaded: tuple[str, dict] | None = None  # (path, state dict): reused, as LoraLoader does

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the LoRA is applied to."}),
                "lora_name": (comfy.lora_file_names(), {"tooltip": "A LoRA from the loras folder."}),
                "strength_model": ("FLOAT", {
                    "default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                    "tooltip": "How strongly to modify the diffusion model (as in 'Load LoRA')."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional: the text encoder to patch too."}),
                "strength_clip": ("FLOAT", {
                    "default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                    "tooltip": "How strongly to modify the CLIP model (ignored without a CLIP)."}),
            },
        }

    def load_lora(self, model, lora_name: str, strength_model: float, clip=None,
                  strength_clip: float = 1.0) -> tuple:
        if clip is None:
            strength_clip = 0.0
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        path = listed_file("lora_name", lora_name, folder="loras",
                           fix="refresh the node (R) and pick an existing file.")
        if self.loaded is None or self.loaded[0] != path:
            self.loaded = (path, comfy.load_lora_file(path))
        new_model, new_clip, extra = comfy.load_lora_complete(
            model, clip, self.loaded[1], strength_model, strength_clip)
        if extra:
            log.info("%s: %d patched parameter(s) ComfyUI's load skips are applied on load "
                     "(e.g. %s)", lora_name, len(extra), extra[0])
        return (new_model, new_clip)
