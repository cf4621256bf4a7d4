"""Stub of ``comfy_api.latest``: ``io`` (the V3 node schema) and ``ComfyExtension``.

Only what a custom node pack written against the V3 schema touches; the behaviour (how a schema
becomes the V1 ``INPUT_TYPES`` ComfyUI's executor and ``/object_info`` use, hidden inputs, the
locked class clone a node runs on, ``NodeOutput``) follows ComfyUI 0.3.64 and newer alike, and
``tests/test_comfy_differential.py`` compares it with the real package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from . import _io as io


class ComfyExtension(ABC):
    """What ``comfy_entrypoint`` returns: ComfyUI awaits ``on_load`` then ``get_node_list``."""

    async def on_load(self) -> None:
        """Called once when ComfyUI loads the extension."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The extension's node classes."""


__all__ = ["ComfyExtension", "io"]
