"""Stub of ``comfy.weight_adapter.base``."""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_management
import torch


class WeightAdapterBase:
    """A loaded patch that knows how to apply itself to one weight."""

    name: str
    loaded_keys: set[str]
    weights: tuple

    @classmethod
    def load(cls, x: str, lora: dict[str, torch.Tensor], alpha: float | None, dora_scale: torch.Tensor | None,
             loaded_keys: set[str] | None = None) -> WeightAdapterBase | None:
        """Build the adapter for LoRA prefix ``x`` or return None when ``lora`` has none."""
        raise NotImplementedError

    def calculate_weight(self, weight: torch.Tensor, key: str, strength: float, strength_model: float,
                         offset: tuple[int, int, int] | None, function: Callable[[torch.Tensor], torch.Tensor],
                         intermediate_dtype: torch.dtype = torch.float32,
                         original_weight: dict | None = None) -> torch.Tensor:
        """Return ``weight`` with this patch applied (may modify ``weight`` in place)."""
        raise NotImplementedError


def pad_tensor_to_shape(tensor: torch.Tensor, new_shape: list[int]) -> torch.Tensor:
    """Zero-pad ``tensor`` at the high end of each dim to ``new_shape`` (no dim may shrink)."""
    if len(new_shape) != len(tensor.shape):
        raise ValueError("The new shape must have the same number of dimensions as the original tensor")
    if any(n < o for n, o in zip(new_shape, tensor.shape, strict=True)):
        raise ValueError("The new shape must be larger than the original tensor in all dimensions")
    out = torch.zeros(list(new_shape), dtype=tensor.dtype, device=tensor.device)
    out[tuple(slice(0, d) for d in tensor.shape)] = tensor
    return out


def weight_decompose(dora_scale: torch.Tensor, weight: torch.Tensor, lora_diff: torch.Tensor, alpha: float,
                     strength: float, intermediate_dtype: torch.dtype,
                     function: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """DoRA: rescale ``weight + alpha * lora_diff`` to the magnitudes in ``dora_scale``.

    Matches ComfyUI 0.3.64 including its quirk: when ``dora_scale`` is per output channel the
    norm is taken of the *original* weight, otherwise (per input channel) of the patched one.
    """
    scale = comfy.model_management.cast_to_device(dora_scale, weight.device, intermediate_dtype)
    lora_diff *= alpha
    patched = weight + function(lora_diff).type(weight.dtype)
    if scale.shape[0] == patched.shape[0]:
        # one norm per output channel, of the unpatched weight
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        # one norm per input channel, of the patched weight
        cols = patched.transpose(0, 1)
        norm = cols.reshape(patched.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(patched.shape[1], *[1] * (patched.dim() - 1)).transpose(0, 1)
    norm = norm + torch.finfo(weight.dtype).eps
    patched *= (scale / norm).type(weight.dtype)
    if strength != 1.0:
        patched -= weight
        weight += strength * patched
    else:
        weight[:] = patched
    return weight
