"""Stub of ``comfy.weight_adapter``: only the LoRA adapter.

The real package also has LoHa, LoKr, GLoRA, OFT and BOFT adapters, tried in that order after
LoRA by ``comfy.lora.load_lora``; keys of those formats are reported as not loaded by the stub.
"""

from .base import WeightAdapterBase, pad_tensor_to_shape, weight_decompose
from .lora import LoRAAdapter

adapters: list[type[WeightAdapterBase]] = [LoRAAdapter]
adapter_maps: dict[str, type[WeightAdapterBase]] = {"LoRA": LoRAAdapter}

__all__ = ["WeightAdapterBase", "LoRAAdapter", "adapters", "adapter_maps", "pad_tensor_to_shape", "weight_decompose"]
