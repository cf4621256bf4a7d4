"""``GGMLTensor`` and a GGML linear layer, behaving as ComfyUI-GGUF's ops.py."""

from __future__ import annotations

import torch

from .dequant import is_quantized


class GGMLTensor(torch.Tensor):
    def __init__(self, *args, tensor_type, tensor_shape, patches=None, **kwargs):
        super().__init__()
        self.tensor_type = tensor_type
        self.tensor_shape = tensor_shape
        self.patches = patches or []

    def __new__(cls, *args, tensor_type, tensor_shape, patches=None, **kwargs):
        return super().__new__(cls, *args, **kwargs)

    def to(self, *args, **kwargs):
        new = super().to(*args, **kwargs)
        new.tensor_type = getattr(self, "tensor_type", None)
        new.tensor_shape = getattr(self, "tensor_shape", new.data.shape)
        new.patches = getattr(self, "patches", []).copy()
        return new

    def clone(self, *args, **kwargs):
        return self

    def detach(self, *args, **kwargs):
        return self

    @property
    def shape(self):
        if not hasattr(self, "tensor_shape"):
            self.tensor_shape = self.size()
        return self.tensor_shape


class GGMLLinear(torch.nn.Module):
    """Holds GGMLTensor weight/bias; saves the placeholder state dict ComfyUI-GGUF saves."""

    largest_layer = False

    def __init__(self, weight: GGMLTensor, bias: GGMLTensor | None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not (is_quantized(self.weight) or is_quantized(self.bias)):
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = torch.zeros_like(self.weight, device=torch.device("meta"))
        if self.bias is not None:
            destination[prefix + "bias"] = torch.zeros_like(self.bias, device=torch.device("meta"))
        if self.largest_layer:
            shape = self.weight.tensor_shape
            destination[prefix + "temp.weight"] = torch.empty(*shape, device="meta", dtype=torch.float16)
