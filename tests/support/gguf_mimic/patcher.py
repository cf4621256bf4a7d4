"""ComfyUI-GGUF's patcher: patches of a quantized weight ride on the weight, unapplied."""

from __future__ import annotations

import comfy.utils
from comfy.model_patcher import ModelPatcher

from .dequant import is_quantized


class GGUFModelPatcher(ModelPatcher):
    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        weight = comfy.utils.get_attr(self.model, key)
        if not is_quantized(weight):
            return super().patch_weight_to_device(key, device_to, inplace_update)
        out = weight.to(device_to) if device_to is not None else weight.to(weight.device)
        out.patches = [(self.patches[key], key)]
        comfy.utils.set_attr_param(self.model, key, out)
