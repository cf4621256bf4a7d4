"""Validation: does BASE + LORA reproduce TUNED, layer by layer, as ComfyUI's loader applies it?

Numeric core like ``extract``: torch, safetensors and numpy only, never ComfyUI.
"""

from .report import ValidationReport
from .validate import validate_lora

__all__ = ["ValidationReport", "validate_lora"]
