"""Stub of ``comfy.sd``: ``CLIP`` (a patcher over a text-encoder module) and ``load_lora_for_models``.

Only what LoraLoader uses, as in ComfyUI 0.3.64: the CLIP key map is the generic one
(``text_encoders.<module>`` for ``.weight`` keys); the real one adds kohya/diffusers names.
"""

from __future__ import annotations

import logging
from typing import Any

import comfy.lora
import comfy.model_patcher
import torch


class CLIP:
    """A text encoder: ``cond_stage_model`` (the module) and ``patcher`` (a ModelPatcher on it)."""

    def __init__(self, module: torch.nn.Module | None = None, no_init: bool = False) -> None:
        if no_init:
            return
        self.cond_stage_model = module
        self.patcher = comfy.model_patcher.ModelPatcher(module, torch.device("cpu"), torch.device("cpu"))

    def clone(self) -> CLIP:
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, patches: dict[Any, Any], strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> list[Any]:
        return self.patcher.add_patches(patches, strength_patch, strength_model)


def model_lora_keys_clip(model: torch.nn.Module, key_map: dict[str, Any] | None = None) -> dict[str, Any]:
    key_map = {} if key_map is None else key_map
    for k in model.state_dict().keys():
        if k.endswith(".weight"):
            key_map["text_encoders.{}".format(k[: -len(".weight")])] = k
    return key_map


def load_lora_for_models(model: Any, clip: CLIP | None, lora: dict[str, torch.Tensor],
                         strength_model: float, strength_clip: float) -> tuple[Any, CLIP | None]:
    """Clones of ``model`` and ``clip`` with the LoRA's patches added at the given strengths."""
    key_map: dict[str, Any] = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = comfy.lora.load_lora(lora, key_map)
    new_model, k = (model.clone(), None) if model is not None else (None, ())
    if new_model is not None:
        k = new_model.add_patches(loaded, strength_model)
    new_clip, k1 = (clip.clone(), None) if clip is not None else (None, ())
    if new_clip is not None:
        k1 = new_clip.add_patches(loaded, strength_clip)
    for x in loaded:
        if x not in set(k) and x not in set(k1):
            logging.warning(f"NOT LOAD {x}")
    return new_model, new_clip
