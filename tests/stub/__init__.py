"""Tests of the ComfyUI stub itself (``tests/comfy_stub``): it behaves like ComfyUI 0.3.64."""
