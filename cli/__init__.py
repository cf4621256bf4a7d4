"""``lora-extract``: the pack's command line (extract, demo, validate, resize), without ComfyUI."""

from .main import main

__all__ = ["main"]
