"""ComfyUI LoRA extraction and resizing pack.

ComfyUI imports this folder as a custom node package (under a module name derived from its
path, hence relative imports only); ``pip install`` makes the same folder importable as
``lora_extract`` with the ``lora-extract`` command. Importing it never imports ComfyUI: the
nodes reach ComfyUI only when they run.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
