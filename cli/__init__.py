"""``lora-extract``: the pack's command line (extract, demo, validate, resize), without ComfyUI."""

from .main import main, run_as_process

__all__ = ["main", "run_as_process"]
