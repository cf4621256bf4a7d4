"""Tests of validation (``validation/``): LoRA application by ComfyUI's rules, its summary, its front ends."""
