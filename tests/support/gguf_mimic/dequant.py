"""``dequantize_tensor`` as ComfyUI-GGUF's: float types cast, block types dequantized."""

from __future__ import annotations

import gguf
import numpy as np
import torch

TORCH_COMPATIBLE = (None, gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def is_quantized(tensor) -> bool:
    return getattr(tensor, "tensor_type", None) not in TORCH_COMPATIBLE


def dequantize_tensor(tensor, dtype=None, dequant_dtype=None):
    qtype = getattr(tensor, "tensor_type", None)
    shape = getattr(tensor, "tensor_shape", tensor.shape)
    if qtype in TORCH_COMPATIBLE:
        return tensor.to(dtype)
    raw = tensor.as_subclass(torch.Tensor).detach().cpu().numpy().view(np.uint8)
    out = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    if dequant_dtype is None:  # ComfyUI-GGUF's default: block arithmetic in float16
        out = out.to(torch.float16)
    return out.reshape(shape).to(tensor.device, dtype=dtype)
