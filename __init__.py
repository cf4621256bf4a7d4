"""ComfyUI LoRA extraction and resizing pack.

ComfyUI imports this folder as a custom node package (under a module name derived from its
path, hence relative imports only); ``pip install`` makes the same folder importable as
``lora_extract`` with the ``lora-extract`` command. Importing it never imports ComfyUI: the
nodes reach ComfyUI only when they run.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Loaded as a lone file, not as a package: pytest does that with the repository root when
    # the checkout's folder name is not a Python identifier (``ComfyUI-LoRA-Extract``), and a
    # relative import would fail there. There is nothing to register in that case.
    NODE_CLASS_MAPPINGS: dict[str, type] = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
