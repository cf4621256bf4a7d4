"""Readers for model storage formats beyond one plain safetensors file: ComfyUI's quantized
formats (fp8, scaled fp8, per-layer ``comfy_quant``), shards with an index, diffusers folders."""

from .dispatch import OPENERS, dequantizing, open_source
from .quantized import QuantizedSource
from .sharded import ShardedSafetensorsSource

__all__ = ["OPENERS", "QuantizedSource", "ShardedSafetensorsSource", "dequantizing", "open_source"]
