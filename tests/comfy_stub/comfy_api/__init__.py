"""Stub of ComfyUI's ``comfy_api`` package: the V3 node API the pack's nodes use (``latest``)."""
