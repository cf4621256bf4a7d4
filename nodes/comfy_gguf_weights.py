"""ComfyUI-GGUF's weights as this pack reads them: format, float32 values and rounding noise.

Reads only the tensor's attributes and, when loaded, ComfyUI-GGUF's own dequantizer (found
through the weight's class); imports nothing from ComfyUI, like ``comfy_weight_storage.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

# --- ComfyUI-GGUF weights -------------------------------------------------------------------
# ComfyUI-GGUF's loaders hold each weight as a ``GGMLTensor``: a torch.Tensor subclass whose
# data are the GGUF block bytes (a [512, 512] Q8_0 weight is [512, 544] uint8) and which carries
# ``tensor_type`` (a gguf.GGMLQuantizationType) and ``tensor_shape`` (the real shape; its
# ``.shape`` answers that). Its patcher keeps LoRA patches of quantized weights beside the codes
# (``weight.patches``) instead of patching them in place, so the codes are always the original
# weight; the patcher's ``patches`` hold the same list, which ``ComfyModelSource`` applies.

def is_gguf_weight(weight: object) -> bool:
    return isinstance(weight, torch.Tensor) and hasattr(weight, "tensor_type") \
        and hasattr(weight, "tensor_shape")


def gguf_type_name(weight: torch.Tensor) -> str:
    t = weight.tensor_type
    return "F32" if t is None else str(getattr(t, "name", t))


def _comfyui_gguf_dequantize_function(weight: torch.Tensor) -> Callable | None:
    """ComfyUI-GGUF's own ``dequant.dequantize_tensor``, found through the weight's class."""
    package = type(weight).__module__.rpartition(".")[0]
    module = sys.modules.get(f"{package}.dequant") if package else None
    fn = getattr(module, "dequantize_tensor", None)
    return fn if callable(fn) else None


def gguf_dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A GGMLTensor as the plain float32 tensor ComfyUI-GGUF dequantizes it to.

    Through ComfyUI-GGUF's own ``dequantize_tensor`` with ``dequant_dtype=float32`` (its
    "dequant_dtype: float32" setting): the block arithmetic in float32, the same values as the
    ``gguf`` package's reference. Its default computes in float16 for quantized types, a
    rounding of 2^-11 relative per element that the small difference of two models need not
    carry. Without ComfyUI-GGUF's module (a tensor built elsewhere): our own dequantizer, equal
    bit for bit to the reference.
    """
    fn = _comfyui_gguf_dequantize_function(weight)
    if fn is not None:
        w = fn(weight, dtype=torch.float32, dequant_dtype=torch.float32)
    else:
        from ..extract.gguf_dequant import dequantize_bytes

        name = gguf_type_name(weight)
        if name in ("F32", "F16", "F64"):
            w = weight.to(torch.float32)
        else:
            block_size, type_size = _gguf_block_sizes(weight)
            w = dequantize_bytes(weight.as_subclass(torch.Tensor).detach(), name, block_size,
                                 type_size)
    w = w.as_subclass(torch.Tensor) if isinstance(w, torch.Tensor) else w
    return w.reshape(tuple(weight.tensor_shape))


def _gguf_block_sizes(weight: torch.Tensor) -> tuple[int, int]:
    from ..extract.gguf_source import import_gguf

    gguf = import_gguf()
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[gguf_type_name(weight)]]
    return int(block_size), int(type_size)


def gguf_weight_noise(weight: torch.Tensor) -> float | None:
    """Estimated Frobenius norm of the rounding error of a quantized GGMLTensor (None: float)."""
    from ..extract.gguf_dequant import noise_norm, rounding_steps

    name = gguf_type_name(weight)
    if name in ("F32", "F16", "F64", "BF16"):
        return None
    block_size, type_size = _gguf_block_sizes(weight)
    codes = weight.as_subclass(torch.Tensor).detach().to("cpu").contiguous().view(torch.uint8)
    steps = rounding_steps(codes.numpy(), name, block_size, type_size)
    return None if steps is None else noise_norm(steps)
