"""Stub of ``comfy.weight_adapter.lora``: the up/down (LoRA, LoCon, DoRA) adapter."""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.model_management
import torch

from .base import WeightAdapterBase, pad_tensor_to_shape, weight_decompose

# (up suffix, down suffix, mid suffix) in the order ComfyUI 0.3.64 tries them; the first up key
# present wins and its down key is then required (a missing one raises KeyError, as in ComfyUI).
LORA_KEY_FORMATS: tuple[tuple[str, str, str | None], ...] = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),  # kohya / ComfyUI
    ("_lora.up.weight", "_lora.down.weight", None),  # old diffusers
    (".lora_B.weight", ".lora_A.weight", None),  # peft / diffusers
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),  # mochi
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),  # transformers
    (".lora_B.default.weight", ".lora_A.default.weight", None),  # qwen / peft default adapter
)


class LoRAAdapter(WeightAdapterBase):
    """``weights`` = (up, down, alpha | None, mid | None, dora_scale | None, reshape | None)."""

    name = "lora"

    def __init__(self, loaded_keys: set[str], weights: tuple) -> None:
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x: str, lora: dict[str, torch.Tensor], alpha: float | None, dora_scale: torch.Tensor | None,
             loaded_keys: set[str] | None = None) -> LoRAAdapter | None:
        """Find the up/down pair for prefix ``x``; record the keys used in ``loaded_keys``."""
        if loaded_keys is None:
            loaded_keys = set()
        for up_sfx, down_sfx, mid_sfx in LORA_KEY_FORMATS:
            up_name = x + up_sfx
            if up_name not in lora:
                continue
            down_name = x + down_sfx
            mid = None
            if mid_sfx is not None and x + mid_sfx in lora:
                mid = lora[x + mid_sfx]
                loaded_keys.add(x + mid_sfx)
            reshape = None
            reshape_name = f"{x}.reshape_weight"
            if reshape_name in lora:
                try:
                    reshape = lora[reshape_name].tolist()
                    loaded_keys.add(reshape_name)
                except Exception:  # noqa: BLE001 - the real loader ignores an unreadable reshape too
                    pass
            weights = (lora[up_name], lora[down_name], alpha, mid, dora_scale, reshape)
            loaded_keys.add(up_name)
            loaded_keys.add(down_name)
            return cls(loaded_keys, weights)
        return None

    def calculate_weight(self, weight: torch.Tensor, key: str, strength: float, strength_model: float,
                         offset: tuple[int, int, int] | None, function: Callable[[torch.Tensor], torch.Tensor],
                         intermediate_dtype: torch.dtype = torch.float32,
                         original_weight: dict | None = None) -> torch.Tensor:
        """``weight += strength * alpha/rank * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)``.

        ``rank`` is ``down.shape[0]``; no alpha means scale 1. Any conv dimensionality works
        because both factors are flattened and the product is reshaped to the weight. A shape
        error is logged as ``ERROR lora <key> <error>`` and leaves the weight unchanged.
        """
        up_t, down_t, alpha, mid_t, dora_scale, reshape = self.weights
        up = comfy.model_management.cast_to_device(up_t, weight.device, intermediate_dtype)
        down = comfy.model_management.cast_to_device(down_t, weight.device, intermediate_dtype)
        if reshape is not None:
            weight = pad_tensor_to_shape(weight, reshape)
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        if mid_t is not None:
            # LoCon/Tucker: fold the (rank, rank, kh, kw) mid into the (rank, in, 1, 1) down
            mid = comfy.model_management.cast_to_device(mid_t, weight.device, intermediate_dtype)
            shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            folded = torch.mm(down.transpose(0, 1).flatten(start_dim=1), mid.transpose(0, 1).flatten(start_dim=1))
            down = folded.reshape(shape).transpose(0, 1)
        try:
            lora_diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
            if dora_scale is not None:
                weight = weight_decompose(dora_scale, weight, lora_diff, scale, strength, intermediate_dtype, function)
            else:
                # (strength * scale) first: the same float32 rounding as ComfyUI
                weight += function(((strength * scale) * lora_diff).type(weight.dtype))
        except Exception as e:  # noqa: BLE001 - ComfyUI logs any error and keeps the weight
            logging.error(f"ERROR {self.name} {key} {e}")
        return weight
