"""Stub of ``comfy.sd``: ``CLIP`` (the object the CLIP socket carries) and ``load_lora_for_models``.

As in ComfyUI 0.3.64: ``cond_stage_model`` is the text-encoder module (``SD1ClipModel``,
``SDXLClipModel``...: the encoders are its children ``clip_l``, ``clip_g``, ``t5xxl``), and
``patcher`` is a ``ModelPatcher`` around it, with ``is_clip = True``; LoraLoader patches it
through ``add_patches`` with keys of ``cond_stage_model.state_dict()``. ``clone()`` shares the
module and clones the patcher. No tokenizer, encoding or device placement. The CLIP key map of
``load_lora_for_models`` is the generic one (``text_encoders.<module>`` for ``.weight`` keys);
the real one adds kohya/diffusers names (``extract/keys/te_keys.py`` models those).
"""

from __future__ import annotations

import logging
from typing import Any

import comfy.lora
import comfy.model_patcher
import torch


class ClipTarget:
    """Like ``comfy.supported_models_base.ClipTarget``: the encoder class and its params."""

    def __init__(self, tokenizer: Any, clip: Any) -> None:
        self.clip = clip
        self.tokenizer = tokenizer
        self.params: dict[str, Any] = {}


class CLIP:
    """Built from a ``ClipTarget`` as the real one is."""

    def __init__(self, target: ClipTarget | None = None, embedding_directory: str | None = None,
                 no_init: bool = False, tokenizer_data: dict | None = None, parameters: int = 0,
                 model_options: dict | None = None) -> None:
        if no_init:
            return
        assert target is not None
        params = target.params.copy()
        cpu = torch.device("cpu")
        self.cond_stage_model = target.clip(**params)
        self.tokenizer = target.tokenizer
        self.patcher = comfy.model_patcher.ModelPatcher(self.cond_stage_model, load_device=cpu,
                                                        offload_device=cpu)
        self.patcher.is_clip = True
        self.layer_idx = None
        self.use_clip_schedule = False
        self.apply_hooks_to_conds = None
        self.tokenizer_options: dict[str, Any] = {}

    def clone(self) -> CLIP:
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        n.layer_idx = self.layer_idx
        n.tokenizer_options = self.tokenizer_options.copy()
        n.use_clip_schedule = self.use_clip_schedule
        n.apply_hooks_to_conds = self.apply_hooks_to_conds
        return n

    def add_patches(self, patches: dict, strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> list:
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def load_sd(self, sd: dict[str, torch.Tensor], full_model: bool = False):
        return self.cond_stage_model.load_state_dict(sd, strict=False)

    def get_sd(self) -> dict[str, torch.Tensor]:
        return self.cond_stage_model.state_dict()

    def get_key_patches(self) -> dict[str, list]:
        return self.patcher.get_key_patches()


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
