"""Tests of the ComfyUI nodes (``nodes/``), run through the ComfyUI stub in ``tests/comfy_stub``."""
