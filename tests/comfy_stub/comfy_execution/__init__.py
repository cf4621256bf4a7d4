"""Stub of ComfyUI's ``comfy_execution`` package (only ``utils``: the executing-node context)."""
